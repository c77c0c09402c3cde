import NIOCore
import Testing

@testable import NBSProtocol

@Suite("Reassembly buffer")
struct ReassemblyBufferTests {
    private func slice(_ stream: [UInt8], _ start: Int, _ end: Int) -> ByteBuffer { buffer(Array(stream[start..<end])) }

    private func readAll(_ r: inout ReassemblyBuffer, maxBytes: Int = .max) -> [UInt8] {
        var out: [UInt8] = []
        while let b = r.read(maxBytes: maxBytes) {
            #expect(b.readableBytes > 0 && b.readableBytes <= maxBytes)
            out += bytes(of: b)
        }
        return out
    }

    @Test("in-order segments are readable at once")
    func inOrder() {
        let stream = patternBytes(300, seed: 1)
        var r = ReassemblyBuffer(capacity: 1000)
        #expect(r.window == 1000)
        #expect(r.read() == nil)
        #expect(r.insert(sequence: 0, slice(stream, 0, 100)) == .accepted(inOrder: 100))
        #expect(r.insert(sequence: 100, slice(stream, 100, 300)) == .accepted(inOrder: 200))
        #expect(r.nextExpected == 300)
        #expect(r.readyBytes == 300)
        #expect(r.window == 700)
        #expect(readAll(&r) == stream)
        #expect(r.consumed == 300)
        #expect(r.readyBytes == 0)
        #expect(r.rightEdge == 1300)
        #expect(r.window == 1000)
        #expect(r.duplicateBytes == 0)
    }

    @Test("segments are read as the slices they arrived in, the last one cut at maxBytes")
    func readSegments() {
        let stream = patternBytes(300, seed: 3)
        var r = ReassemblyBuffer(capacity: 1000)
        let arrived = slice(stream, 0, 100)
        #expect(r.insert(sequence: 0, arrived) == .accepted(inOrder: 100))
        #expect(r.insert(sequence: 100, slice(stream, 100, 300)) == .accepted(inOrder: 200))
        let first = r.readSegments(maxBytes: 150)
        #expect(first?.map(\.readableBytes) == [100, 50])
        // A slice of the buffer that arrived, not a copy of it.
        let address = { (b: ByteBuffer) in b.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress) } }
        #expect(first.map { address($0[0]) } == address(arrived))
        #expect(r.readyBytes == 150)
        #expect(r.consumed == 150)
        #expect(r.readSegments(maxBytes: 0) == nil)
        let rest = r.readSegments()
        #expect(rest?.map(\.readableBytes) == [150])
        #expect(((first ?? []) + (rest ?? [])).flatMap(bytes(of:)) == stream)
        #expect(r.readSegments() == nil)
        #expect(bytes(of: ByteBuffer(joining: [slice(stream, 0, 10), slice(stream, 10, 30)])) == Array(stream[0..<30]))
    }

    @Test("out-of-order segments wait for the gap, then all become readable")
    func outOfOrder() {
        let stream = patternBytes(400, seed: 2)
        var r = ReassemblyBuffer(capacity: 1000)
        #expect(r.insert(sequence: 300, slice(stream, 300, 400)) == .accepted(inOrder: 0))
        #expect(r.insert(sequence: 100, slice(stream, 100, 200)) == .accepted(inOrder: 0))
        #expect(r.outOfOrderSegments == 2)
        #expect(r.outOfOrderBytes == 200)
        #expect(r.read() == nil)
        #expect(r.insert(sequence: 0, slice(stream, 0, 100)) == .accepted(inOrder: 200))
        #expect(r.nextExpected == 200)
        #expect(r.insert(sequence: 200, slice(stream, 200, 300)) == .accepted(inOrder: 200))
        #expect(r.outOfOrderSegments == 0)
        #expect(r.outOfOrderBytes == 0)
        #expect(readAll(&r) == stream)
        #expect(r.duplicateBytes == 0)
    }

    @Test("read(maxBytes:) splits a segment")
    func partialReads() {
        let stream = patternBytes(100, seed: 3)
        var r = ReassemblyBuffer(capacity: 100)
        _ = r.insert(sequence: 0, slice(stream, 0, 100))
        #expect(bytes(of: r.read(maxBytes: 30)!) == Array(stream[0..<30]))
        #expect(r.readyBytes == 70)
        #expect(r.consumed == 30)
        #expect(r.rightEdge == 130)
        #expect(readAll(&r, maxBytes: 7) == Array(stream[30...]))
    }

    @Test("data at or beyond the right edge is refused and changes nothing")
    func beyondWindow() {
        let stream = patternBytes(200, seed: 4)
        var r = ReassemblyBuffer(capacity: 100)
        #expect(r.insert(sequence: 100, slice(stream, 100, 101)) == .beyondWindow)
        #expect(r.insert(sequence: 90, slice(stream, 90, 101)) == .beyondWindow)  // straddles the edge
        #expect(r.insert(sequence: 5000, slice(stream, 0, 10)) == .beyondWindow)
        #expect(r.outOfOrderBytes == 0 && r.readyBytes == 0 && r.nextExpected == 0)
        #expect(r.insert(sequence: 90, slice(stream, 90, 100)) == .accepted(inOrder: 0))
        #expect(r.insert(sequence: 0, slice(stream, 0, 90)) == .accepted(inOrder: 100))
        #expect(r.window == 0)
        #expect(r.insert(sequence: 100, slice(stream, 100, 101)) == .beyondWindow)
        // Reading opens the window by what was read.
        _ = r.read(maxBytes: 40)
        #expect(r.window == 40)
        #expect(r.insert(sequence: 100, slice(stream, 100, 140)) == .accepted(inOrder: 40))
        #expect(r.insert(sequence: 140, slice(stream, 140, 141)) == .beyondWindow)
    }

    @Test("duplicates are counted byte for byte")
    func duplicates() {
        let stream = patternBytes(300, seed: 5)
        var r = ReassemblyBuffer(capacity: 1000)
        _ = r.insert(sequence: 0, slice(stream, 0, 100))
        #expect(r.insert(sequence: 0, slice(stream, 0, 100)) == .duplicate)
        #expect(r.duplicateBytes == 100)
        #expect(r.insert(sequence: 50, slice(stream, 50, 100)) == .duplicate)
        #expect(r.duplicateBytes == 150)
        // Partly old, partly new: only the new part is delivered.
        #expect(r.insert(sequence: 80, slice(stream, 80, 120)) == .accepted(inOrder: 20))
        #expect(r.duplicateBytes == 170)
        // Out of order, then the same again, then a superset with new bytes on both sides.
        #expect(r.insert(sequence: 200, slice(stream, 200, 220)) == .accepted(inOrder: 0))
        #expect(r.insert(sequence: 200, slice(stream, 200, 220)) == .duplicate)
        #expect(r.duplicateBytes == 190)
        #expect(r.insert(sequence: 190, slice(stream, 190, 230)) == .accepted(inOrder: 0))
        #expect(r.duplicateBytes == 210)
        #expect(r.outOfOrderBytes == 40)
        #expect(r.insert(sequence: 120, slice(stream, 120, 190)) == .accepted(inOrder: 110))
        #expect(readAll(&r) == Array(stream[0..<230]))
        #expect(r.duplicateBytes == 210)
    }

    @Test("in-order data covering stored segments counts them as duplicates")
    func inOrderOverStoredSegment() {
        let stream = patternBytes(100, seed: 6)
        var r = ReassemblyBuffer(capacity: 100)
        #expect(r.insert(sequence: 20, slice(stream, 20, 30)) == .accepted(inOrder: 0))
        // Covers [20, 30) completely: those stored bytes are the duplicates.
        #expect(r.insert(sequence: 0, slice(stream, 0, 40)) == .accepted(inOrder: 40))
        #expect(r.duplicateBytes == 10)
        #expect(r.outOfOrderBytes == 0)
        #expect(readAll(&r) == Array(stream[0..<40]))
    }

    /// drainOutOfOrder drops the front of a stored segment that in-order data overlapped
    /// (`data.moveReaderIndex(forwardBy: nextExpected - entry.sequence)`) without adding it to
    /// duplicateBytes, so the counter under-reports.
    @Test("in-order data overlapping the front of a stored segment counts the overlap as duplicate")
    func inOrderOverlappingStoredSegment() {
        let stream = patternBytes(100, seed: 7)
        var r = ReassemblyBuffer(capacity: 100)
        #expect(r.insert(sequence: 20, slice(stream, 20, 50)) == .accepted(inOrder: 0))
        #expect(r.insert(sequence: 0, slice(stream, 0, 40)) == .accepted(inOrder: 50))
        #expect(readAll(&r) == Array(stream[0..<50]))
        #expect(r.outOfOrderBytes == 0)
        do {
            #expect(r.duplicateBytes == 20)
        }
    }

    @Test("random interleavings across subflows deliver the exact stream", arguments: [UInt64(1), 2, 3, 4, 5, 6])
    func randomInterleavings(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        let length = 300_000
        let capacity = Int.random(in: 4096...65536, using: &rng)
        let stream = patternBytes(length, seed: seed &* 77)
        let subflowCount = Int.random(in: 2...4, using: &rng)
        var subflows = [[(UInt64, Int)]](repeating: [], count: subflowCount)  // FIFO of (sequence, length)
        var r = ReassemblyBuffer(capacity: capacity)
        var sent = 0  // first byte never sent
        var delivered: [UInt8] = []
        var inserted = 0
        var lastRightEdge = r.rightEdge
        var steps = 0

        while delivered.count < length {
            steps += 1
            if steps > 2_000_000 {
                Issue.record("no progress")
                return
            }
            let action = Int.random(in: 0..<10, using: &rng)
            if action < 3, sent < length {
                // New data, within the window the sender last heard of.
                let edge = Int(r.rightEdge)
                if sent < edge {
                    let n = min(Int.random(in: 1...3000, using: &rng), edge - sent, length - sent)
                    subflows[Int.random(in: 0..<subflowCount, using: &rng)].append((UInt64(sent), n))
                    sent += n
                }
            } else if action == 3, sent > 0 {
                // A re-sent range with boundaries of its own (reinjection after a reshuffle).
                let start = Int.random(in: max(0, sent - 20000)..<sent, using: &rng)
                let n = Int.random(in: 1...min(5000, sent - start), using: &rng)
                subflows[Int.random(in: 0..<subflowCount, using: &rng)].append((UInt64(start), n))
            } else if action < 8 {
                let candidates = subflows.indices.filter { !subflows[$0].isEmpty }
                guard let i = candidates.randomElement(using: &rng) else { continue }
                let (sequence, n) = subflows[i].removeFirst()
                let before = r.nextExpected
                let outcome = r.insert(sequence: sequence, slice(stream, Int(sequence), Int(sequence) + n))
                inserted += n
                switch outcome {
                case .beyondWindow:
                    Issue.record("segment \(sequence)+\(n) refused although sent within the window")
                    return
                case .accepted(let inOrder):
                    #expect(Int(r.nextExpected - before) == inOrder)
                case .duplicate:
                    #expect(r.nextExpected == before)
                    #expect(sequence + UInt64(n) <= r.nextExpected || r.outOfOrderBytes > 0)
                }
            } else {
                if let b = r.read(maxBytes: Int.random(in: 1...8000, using: &rng)) { delivered += bytes(of: b) }
            }
            // Invariants after every step.
            #expect(r.readyBytes + r.outOfOrderBytes <= capacity)
            #expect(r.rightEdge >= lastRightEdge)
            lastRightEdge = r.rightEdge
            #expect(r.nextExpected >= r.consumed && r.nextExpected <= r.rightEdge)
            #expect(r.consumed == UInt64(delivered.count))
            #expect(r.window == UInt32(r.rightEdge - r.nextExpected))
            if steps % 97 == 0 { #expect(delivered[...] == stream[0..<delivered.count]) }
        }
        #expect(delivered == stream)
        // Every inserted byte is delivered once or counted as a duplicate (bounded from above:
        // see inOrderOverlappingStoredSegment for the known under-count).
        #expect(r.duplicateBytes <= inserted - length - r.outOfOrderBytes)
        #expect(r.duplicateBytes > 0)
    }

    /// A peer sends DATA with a sequence number near 2^64: `sequence + length` must not overflow
    /// (it used to trap, so any peer could crash the process). It is .beyondWindow.
    @Test("a sequence number near 2^64 is beyond the window, not a crash")
    func sequenceOverflow() async {
        do {
            await #expect(processExitsWith: .success) {
                var r = ReassemblyBuffer(capacity: 1024)
                let outcome = r.insert(sequence: .max - 1, ByteBuffer(bytes: [1, 2, 3]))
                guard outcome == .beyondWindow else { fatalError("expected .beyondWindow, got \(outcome)") }
            }
        }
    }
}

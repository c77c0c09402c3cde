import NIOCore
import Testing

@testable import NBSProtocol

/// A window edge far beyond any test stream (see `unboundedWindowEdge` for UInt64.max itself).
private let unlimited = UInt64(1) << 40

@Suite("Send buffer")
struct SendBufferTests {
    private let a = SubflowID(1)
    private let b = SubflowID(2)
    private let c = SubflowID(3)

    private func address(of buffer: ByteBuffer) -> UInt {
        buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
    }

    /// Drains every transmission allowed now on `subflow`.
    private func drain(_ s: inout SendBuffer, on subflow: SubflowID, maxLength: Int, windowEdge: UInt64 = unlimited) -> [SendBuffer.Transmission] {
        var out: [SendBuffer.Transmission] = []
        while let t = s.nextTransmission(on: subflow, maxLength: maxLength, windowEdge: windowEdge) { out.append(t) }
        return out
    }

    @Test("the head of line: the oldest unacknowledged segment and the later ones on its subflow, as copies, when that subflow carries it")
    func headOfLine() throws {
        var s = SendBuffer(capacity: 1 << 20)
        let stream = patternBytes(400, seed: 3)
        s.append(buffer(stream))
        _ = drain(&s, on: a, maxLength: 100, windowEdge: 200)   // a: 0..<100, 100..<200
        _ = drain(&s, on: b, maxLength: 100, windowEdge: 300)   // b: 200..<300
        _ = drain(&s, on: a, maxLength: 100)                    // a: 300..<400
        #expect(s.headOfLine(on: b, maxBytes: 1000).isEmpty, "b does not carry the oldest segment")
        let copies = s.headOfLine(on: a, maxBytes: 250)
        #expect(copies.map(\.sequence) == [0, 100, 300])
        #expect(copies.map(\.payload.readableBytes) == [100, 100, 50])
        #expect(copies.map { bytes(of: $0.payload) } == [Array(stream[0..<100]), Array(stream[100..<200]), Array(stream[300..<350])])
        // Copies, not reinjections: the segments stay on `a`, nothing waits to be sent again.
        #expect(!s.hasReinjectionPending)
        #expect(s.inFlightBytes(on: a) == 300)
        // Acknowledged in part: the head starts at the acknowledgement.
        try s.acknowledge(upTo: 150)
        #expect(s.headOfLine(on: a, maxBytes: 1000).map(\.sequence) == [150, 300])
        // Once b's segment is the oldest, a no longer holds the peer up.
        try s.acknowledge(upTo: 200)
        #expect(s.headOfLine(on: a, maxBytes: 1000).isEmpty)
        #expect(s.headOfLine(on: b, maxBytes: 1000).map(\.sequence) == [200])
        // Marked for reinjection (its subflow died): the reinjection sends it, not a copy.
        s.reinject(from: b)
        #expect(s.headOfLine(on: b, maxBytes: 1000).isEmpty)
    }

    @Test("what the peer reports holding on a subflow is not sent again when that subflow goes, nor copied as the head")
    func peerReceivedOnSubflow() throws {
        var s = SendBuffer(capacity: 1 << 20)
        s.append(buffer(patternBytes(600, seed: 4)))
        _ = drain(&s, on: a, maxLength: 100, windowEdge: 100)   // a: 0..<100 (a's count 100)
        _ = drain(&s, on: b, maxLength: 100, windowEdge: 200)   // b: 100..<200
        _ = drain(&s, on: a, maxLength: 100, windowEdge: 400)   // a: 200..<300 (200), 300..<400 (300)
        // The peer holds a's first two segments, but b's is missing: the cumulative ack stays at 0.
        try s.peerReceived(200, on: a)
        try s.peerReceived(150, on: a)  // an older report, overtaken: changes nothing
        #expect(s.headOfLine(on: a, maxBytes: 1000).isEmpty, "the first segment the peer lacks is b's")
        #expect(s.headOfLine(on: b, maxBytes: 1000).map(\.sequence) == [100])
        // Held data is not sent again, but for the oldest segment, whose duplicate draws a fresh ack.
        #expect(s.reinject(from: a) == 200, "0..<100, the oldest, and 300..<400, which the peer does not hold")
        let again = drain(&s, on: c, maxLength: 1000, windowEdge: 400)
        #expect(again.map(\.sequence) == [0, 300])
        // c's count goes on from the reinjections; copies sent on c count too.
        s.noteCopies(50, on: c)
        _ = drain(&s, on: c, maxLength: 100, windowEdge: 500)   // c: 400..<500, ending at c's 350
        try s.peerReceived(250, on: c)
        #expect(s.reinject(from: c) == 200, "c's count at 250 covers both reinjections and the copies; 0..<100 is the oldest, and 400..<500 not held")
        #expect(throws: SendBuffer.ReceptionReportError.beyondSent(reported: 351, sent: 350)) { try s.peerReceived(351, on: c) }
        // Held segments stay in flight until the cumulative ack passes them.
        #expect(s.inFlightBytes(on: a) == 100)
        try s.acknowledge(upTo: 500)
        #expect(s.inFlightSegments == 0)
    }

    @Test("the oldest segment, held by the peer's report but not acknowledged, can be sent again to draw a fresh ack")
    func resendOldestHeld() throws {
        var s = SendBuffer(capacity: 1 << 20)
        s.append(buffer(patternBytes(300, seed: 5)))
        _ = drain(&s, on: a, maxLength: 100)   // a: 0..<100, 100..<200, 200..<300
        #expect(s.resendOldestHeld() == 0, "no report yet: it may simply be on its way")
        try s.peerReceived(300, on: a)
        #expect(s.resendOldestHeld() == 100)
        #expect(s.resendOldestHeld() == 0, "marked already")
        #expect(drain(&s, on: b, maxLength: 1000, windowEdge: 300).map(\.sequence) == [0])
        try s.acknowledge(upTo: 300)
        #expect(s.resendOldestHeld() == 0)
    }

    @Test("segments never cross chunk boundaries and are zero-copy slices of the chunks")
    func segmentsAreSlices() throws {
        let sizes = [10, 100, 7, 64, 1]
        let stream = patternBytes(sizes.reduce(0, +), seed: 1)
        var s = SendBuffer(capacity: 1 << 20)
        var chunks: [(start: Int, buffer: ByteBuffer)] = []
        var offset = 0
        for size in sizes {
            let chunk = buffer(Array(stream[offset..<offset + size]))
            chunks.append((offset, chunk))
            s.append(chunk)
            offset += size
        }
        #expect(s.end == UInt64(stream.count))
        #expect(s.unsentBytes == stream.count)

        let sent = drain(&s, on: a, maxLength: 32)
        #expect(sent.map(\.sequence) == [0, 10, 42, 74, 106, 110, 117, 149, 181])
        #expect(sent.map(\.payload.readableBytes) == [10, 32, 32, 32, 4, 7, 32, 32, 1])
        for t in sent {
            #expect(!t.isReinjection)
            let start = Int(t.sequence)
            let end = start + t.payload.readableBytes
            #expect(bytes(of: t.payload) == Array(stream[start..<end]))
            let chunk = try #require(chunks.last { $0.start <= start })
            #expect(end <= chunk.start + chunk.buffer.readableBytes, "segment \(start)..<\(end) crosses a chunk boundary")
            #expect(address(of: t.payload) == address(of: chunk.buffer) + UInt(start - chunk.start), "segment \(start) is a copy")
        }
        #expect(s.nextNew == s.end)
        #expect(s.unsentBytes == 0)
        #expect(s.inFlightSegments == sent.count)
        #expect(s.inFlightBytes(on: a) == stream.count)
        #expect(s.nextTransmission(on: a, maxLength: 32, windowEdge: unlimited) == nil)
    }

    @Test("the window edge limits new data")
    func windowEdge() {
        var s = SendBuffer(capacity: 1000)
        s.append(buffer(patternBytes(100, seed: 2)))
        #expect(s.nextTransmission(on: a, maxLength: 64, windowEdge: 0) == nil)
        let first = drain(&s, on: a, maxLength: 64, windowEdge: 50)
        #expect(first.map(\.payload.readableBytes) == [50])
        #expect(s.nextNew == 50)
        let second = drain(&s, on: b, maxLength: 64, windowEdge: 51)
        #expect(second.map(\.payload.readableBytes) == [1])
        let rest = drain(&s, on: b, maxLength: 64, windowEdge: 10_000)
        #expect(rest.map(\.sequence) == [51])
        #expect(rest.map(\.payload.readableBytes) == [49])
    }

    @Test("acknowledgements free space; stale ones are harmless; acks beyond what was sent throw")
    func acknowledge() throws {
        var s = SendBuffer(capacity: 300)
        #expect(s.freeSpace == 300)
        s.append(buffer(patternBytes(200, seed: 3)))
        s.append(ByteBuffer())  // ignored
        #expect(s.bufferedBytes == 200)
        #expect(s.freeSpace == 100)
        _ = drain(&s, on: a, maxLength: 50, windowEdge: 150)
        #expect(s.nextNew == 150)

        #expect(throws: SendBuffer.AcknowledgeError.beyondSent(ack: 151, sent: 150)) { try s.acknowledge(upTo: 151) }
        #expect(try s.acknowledge(upTo: 50) == 50)
        #expect(s.acknowledged == 50)
        #expect(s.bufferedBytes == 150)
        #expect(s.freeSpace == 150)
        #expect(s.inFlightSegments == 2)
        #expect(try s.acknowledge(upTo: 20) == 0)  // stale
        #expect(try s.acknowledge(upTo: 50) == 0)  // repeated
        #expect(s.acknowledged == 50)
        #expect(try s.acknowledge(upTo: 150) == 100)
        #expect(s.inFlightSegments == 0)
        #expect(s.inFlightBytes(on: a) == 0)
        #expect(s.bufferedBytes == 50)
        // The unsent rest is intact after the chunk it lives in was partly freed.
        let rest = drain(&s, on: a, maxLength: 1000)
        #expect(rest.count == 1)
        #expect(bytes(of: rest[0].payload) == Array(patternBytes(200, seed: 3)[150...]))
        #expect(try s.acknowledge(upTo: 200) == 50)
        #expect(s.freeSpace == 300)
    }

    @Test("an ack inside a segment trims it; a reinjection sends only the rest")
    func partialAck() throws {
        let stream = patternBytes(100, seed: 4)
        var s = SendBuffer(capacity: 1000)
        s.append(buffer(stream))
        _ = drain(&s, on: a, maxLength: 40)  // [0,40) [40,80) [80,100)
        #expect(try s.acknowledge(upTo: 10) == 10)
        #expect(s.inFlightSegments == 3)
        #expect(s.inFlightBytes(on: a) == 90)
        #expect(try s.acknowledge(upTo: 55) == 45)
        #expect(s.inFlightSegments == 2)
        #expect(s.inFlightBytes(on: a) == 45)
        #expect(s.reinject(from: a) == 45)
        let again = drain(&s, on: b, maxLength: 40)
        #expect(again.map(\.sequence) == [55, 80])
        #expect(again.map(\.payload.readableBytes) == [25, 20])
        #expect(again.allSatisfy { $0.isReinjection })
        #expect(bytes(of: again[0].payload) == Array(stream[55..<80]))
        #expect(bytes(of: again[1].payload) == Array(stream[80..<100]))
    }

    @Test("reinject(from:) marks exactly that subflow's segments, which go first with identical bytes")
    func reinjection() throws {
        let stream = patternBytes(1000, seed: 5)
        var s = SendBuffer(capacity: 10_000)
        s.append(buffer(Array(stream[0..<600])))
        s.append(buffer(Array(stream[600..<1000])))
        var original: [UInt64: (SubflowID, [UInt8])] = [:]
        var turn = 0
        // Alternate a, b, a, b, ... for the first 700 bytes.
        while s.nextNew < 700 {
            let subflow = turn % 2 == 0 ? a : b
            let next137 = s.nextTransmission(on: subflow, maxLength: 100, windowEdge: 700)
            let t = try #require(next137)
            original[t.sequence] = (subflow, bytes(of: t.payload))
            turn += 1
        }
        let onA = original.values.filter { $0.0 == a }.reduce(0) { $0 + $1.1.count }
        #expect(s.inFlightBytes(on: a) == onA)
        #expect(!s.hasReinjectionPending)

        #expect(s.reinject(from: a) == onA)
        #expect(s.hasReinjectionPending)
        #expect(s.inFlightBytes(on: a) == 0)
        #expect(s.reinject(from: a) == 0)  // already marked
        #expect(s.reinject(from: c) == 0)  // nothing there

        // Reinjections come before new data, even past the window edge the new data respects.
        var reinjected: [SendBuffer.Transmission] = []
        while s.hasReinjectionPending {
            let next154 = s.nextTransmission(on: c, maxLength: 100, windowEdge: 0)
            reinjected.append(try #require(next154))
        }
        let expectedSequences = original.filter { $0.value.0 == a }.keys.sorted()
        #expect(reinjected.map(\.sequence) == expectedSequences)
        for t in reinjected {
            #expect(t.isReinjection)
            #expect(bytes(of: t.payload) == original[t.sequence]!.1)
        }
        #expect(s.inFlightBytes(on: c) == onA)
        #expect(s.inFlightBytes(on: b) == 700 - onA)
        // Then new data, not marked as reinjection.
        let next165 = s.nextTransmission(on: c, maxLength: 100, windowEdge: 1000)
        let next = try #require(next165)
        #expect(!next.isReinjection)
        #expect(next.sequence == 700)
        // Moved segments belong to c now: reinjecting a again finds nothing; c does.
        #expect(s.reinject(from: a) == 0)
        #expect(s.reinject(from: c) == onA + 100)
    }

    @Test("a reinjected segment is cut to the new subflow's size, in order, each piece once; the rest can go elsewhere")
    func reinjectionCutToSize() throws {
        let stream = patternBytes(300, seed: 7)
        var s = SendBuffer(capacity: 1000)
        s.append(buffer(stream))
        _ = drain(&s, on: a, maxLength: 200)  // [0,200) [200,300)
        #expect(s.reinject(from: a) == 300)
        let firstPiece = s.nextTransmission(on: b, maxLength: 64, windowEdge: 0)
        let secondPiece = s.nextTransmission(on: c, maxLength: 100, windowEdge: 0)
        let first = try #require(firstPiece)
        let second = try #require(secondPiece)
        let rest = drain(&s, on: b, maxLength: 64)
        let pieces = [first, second] + rest
        #expect(pieces.map(\.sequence) == [0, 64, 164, 200, 264])
        #expect(pieces.map(\.payload.readableBytes) == [64, 100, 36, 64, 36])
        #expect(pieces.allSatisfy { $0.isReinjection })
        #expect(pieces.flatMap { bytes(of: $0.payload) } == stream)
        #expect(!s.hasReinjectionPending)
        #expect(s.pendingReinjectionBytes == 0)
        #expect(s.inFlightBytes(on: c) == 100)
        #expect(s.inFlightBytes(on: b) == 200)
        // The pieces are segments of their own: c's can be sent again alone.
        #expect(s.reinject(from: c) == 100)
        let freed = try s.acknowledge(upTo: 300)
        #expect(freed == 300)
        #expect(!s.hasReinjectionPending)
        #expect(s.inFlightSegments == 0)
    }

    @Test("an acknowledgement cancels a pending reinjection")
    func ackCancelsReinjection() throws {
        var s = SendBuffer(capacity: 1000)
        s.append(buffer(patternBytes(300, seed: 6)))
        _ = drain(&s, on: a, maxLength: 100)
        #expect(s.reinject(from: a) == 300)
        #expect(try s.acknowledge(upTo: 200) == 200)
        #expect(s.hasReinjectionPending)
        let next181 = s.nextTransmission(on: b, maxLength: 100, windowEdge: unlimited)
        let t = try #require(next181)
        #expect(t.sequence == 200 && t.isReinjection)
        #expect(!s.hasReinjectionPending)
        #expect(s.reinject(from: b) == 100)
        #expect(try s.acknowledge(upTo: 300) == 100)
        #expect(!s.hasReinjectionPending)
        #expect(s.nextTransmission(on: b, maxLength: 100, windowEdge: unlimited) == nil)
    }

    @Test("random operations keep every transmission faithful to the stream", arguments: [UInt64(1), 2, 3, 4])
    func randomOperations(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let stream = patternBytes(200_000, seed: seed)
        let subflows = (1...4).map { SubflowID(UInt32($0)) }
        var s = SendBuffer(capacity: 64 * 1024)
        var chunkEnds: [Int] = []
        var written = 0
        var windowEdge: UInt64 = 0
        /// Which bytes each subflow carries and the peer has not acknowledged: model of in-flight data.
        var everSent = 0
        var reinjectionsExpected = 0
        var reinjectionsSeen = 0
        for _ in 0..<20_000 {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0, 1:
                guard written < stream.count, s.freeSpace > 0 else { continue }
                let n = min(Int.random(in: 1...5000, using: &rng), stream.count - written, s.freeSpace)
                s.append(buffer(Array(stream[written..<written + n])))
                written += n
                chunkEnds.append(written)
            case 2:
                windowEdge = max(windowEdge, s.acknowledged + UInt64(Int.random(in: 0...40_000, using: &rng)))
            case 3:
                let ack = UInt64.random(in: 0...s.nextNew, using: &rng)
                let before = s.acknowledged
                let freed = try s.acknowledge(upTo: ack)
                #expect(freed == Int(ack > before ? ack - before : 0))
                if rng.chance(0.1) {
                    #expect(throws: SendBuffer.AcknowledgeError.self) { try s.acknowledge(upTo: s.nextNew + 1) }
                }
            case 4:
                reinjectionsExpected += s.reinject(from: subflows.randomElement(using: &rng)!)
            default:
                let subflow = subflows.randomElement(using: &rng)!
                let hadReinjection = s.hasReinjectionPending
                let maxLength = Int.random(in: 1...3000, using: &rng)
                guard let t = s.nextTransmission(on: subflow, maxLength: maxLength, windowEdge: windowEdge) else {
                    #expect(!hadReinjection)
                    #expect(s.unsentBytes == 0 || s.nextNew >= windowEdge)
                    continue
                }
                #expect(t.isReinjection == hadReinjection)
                let start = Int(t.sequence)
                let end = start + t.payload.readableBytes
                #expect(t.payload.readableBytes > 0)
                #expect(UInt64(start) >= s.acknowledged)
                #expect(bytes(of: t.payload) == Array(stream[start..<end]))
                // Within one chunk.
                let chunkEnd = chunkEnds.first { $0 > start }!
                #expect(end <= chunkEnd)
                if t.isReinjection {
                    #expect(end <= everSent)
                    reinjectionsSeen += t.payload.readableBytes
                } else {
                    #expect(t.payload.readableBytes <= maxLength)
                    #expect(UInt64(end) <= windowEdge)
                    #expect(start == everSent)
                    everSent = end
                }
            }
            #expect(s.bufferedBytes == Int(s.end - s.acknowledged))
            #expect(s.nextNew == UInt64(everSent))
            #expect(s.end == UInt64(written))
            let inFlight = subflows.reduce(0) { $0 + s.inFlightBytes(on: $1) }
            #expect(inFlight <= Int(s.nextNew - s.acknowledged))
        }
        // Reinjected bytes never exceed what was marked (acks may cancel some).
        #expect(reinjectionsSeen <= reinjectionsExpected)
        #expect(reinjectionsSeen > 0)
        #expect(everSent > 0)
    }

    /// An edge more than Int.max ahead (e.g. UInt64.max as "no limit") must not trap. SessionCore
    /// never passes such an edge (its edge is an ack plus a UInt32 window); other callers may.
    @Test("UInt64.max as the window edge means no limit")
    func unboundedWindowEdge() async {
        do {
            await #expect(processExitsWith: .success) {
                var s = SendBuffer(capacity: 100)
                s.append(ByteBuffer(bytes: [1, 2, 3]))
                guard s.nextTransmission(on: SubflowID(1), maxLength: 10, windowEdge: .max)?.payload.readableBytes == 3 else {
                    fatalError("expected one 3-byte segment")
                }
            }
        }
    }
}

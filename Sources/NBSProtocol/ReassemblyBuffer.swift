import NIOCore

/// The receiver's side of the data sequence space. Segments arrive from several subflows in any
/// order, possibly more than once (reinjection); every byte is delivered once, in order. Memory is
/// bounded by `capacity`: the peer may only send below `rightEdge`, which never moves backwards.
public struct ReassemblyBuffer: Sendable {
    public enum InsertOutcome: Equatable, Sendable {
        /// `inOrder` bytes became readable (0 when the segment was only stored out of order).
        case accepted(inOrder: Int)
        case duplicate
        case beyondWindow
    }

    private var ready = CircularBuffer<ByteBuffer>()
    /// Sorted by sequence, never overlapping, all above `nextExpected`.
    private var outOfOrder: [(sequence: UInt64, bytes: ByteBuffer)] = []
    public private(set) var readyBytes = 0
    public private(set) var outOfOrderBytes = 0
    /// Every byte below this has been received.
    public private(set) var nextExpected: UInt64 = 0
    /// Bytes handed to the application.
    public private(set) var consumed: UInt64 = 0
    public private(set) var duplicateBytes = 0
    public let capacity: Int

    public init(capacity: Int) { self.capacity = capacity }

    public var rightEdge: UInt64 { consumed + UInt64(capacity) }
    public var window: UInt32 { UInt32(clamping: rightEdge - nextExpected) }
    public var outOfOrderSegments: Int { outOfOrder.count }

    public mutating func insert(sequence: UInt64, _ bytes: ByteBuffer) -> InsertOutcome {
        var start = sequence
        var data = bytes
        // A peer picks `sequence`: the sum must not trap.
        let (end, overflow) = sequence.addingReportingOverflow(UInt64(data.readableBytes))
        guard !overflow else { return .beyondWindow }
        guard end > nextExpected else {
            duplicateBytes += data.readableBytes
            return .duplicate
        }
        guard start < rightEdge else { return .beyondWindow }
        if end > rightEdge { return .beyondWindow }
        if start < nextExpected {
            let cut = Int(nextExpected - start)
            duplicateBytes += cut
            data.moveReaderIndex(forwardBy: cut)
            start = nextExpected
        }
        if start == nextExpected {
            let before = nextExpected
            appendReady(data)
            drainOutOfOrder()
            return .accepted(inOrder: Int(nextExpected - before))
        }
        return storeOutOfOrder(start, data) ? .accepted(inOrder: 0) : .duplicate
    }

    private mutating func appendReady(_ data: ByteBuffer) {
        ready.append(data)
        readyBytes += data.readableBytes
        nextExpected += UInt64(data.readableBytes)
    }

    private mutating func drainOutOfOrder() {
        var removed = 0
        for entry in outOfOrder {
            guard entry.sequence <= nextExpected else { break }
            removed += 1
            outOfOrderBytes -= entry.bytes.readableBytes
            let end = entry.sequence + UInt64(entry.bytes.readableBytes)
            guard end > nextExpected else {
                duplicateBytes += entry.bytes.readableBytes
                continue
            }
            var data = entry.bytes
            let overlap = Int(nextExpected - entry.sequence)
            duplicateBytes += overlap
            data.moveReaderIndex(forwardBy: overlap)
            appendReady(data)
        }
        outOfOrder.removeFirst(removed)
    }

    /// Highest sequence held (in order or not), for checking a DATA_FIN against what arrived.
    public var highestReceived: UInt64 {
        guard let last = outOfOrder.last else { return nextExpected }
        return max(nextExpected, last.sequence + UInt64(last.bytes.readableBytes))
    }

    /// Stores the parts of [start, start+len) not already held. Returns false if nothing was new.
    private mutating func storeOutOfOrder(_ start: UInt64, _ data: ByteBuffer) -> Bool {
        let end = start + UInt64(data.readableBytes)
        // First entry that ends after `start`.
        var low = 0
        var high = outOfOrder.count
        while low < high {
            let mid = (low + high) / 2
            let e = outOfOrder[mid]
            if e.sequence + UInt64(e.bytes.readableBytes) <= start { low = mid + 1 } else { high = mid }
        }
        var pieces: [(UInt64, ByteBuffer)] = []
        var cursor = start
        var index = low
        while cursor < end {
            let gapEnd: UInt64
            if index < outOfOrder.count, outOfOrder[index].sequence < end {
                gapEnd = max(cursor, outOfOrder[index].sequence)
            } else {
                gapEnd = end
            }
            if gapEnd > cursor {
                pieces.append((cursor, data.getSlice(at: data.readerIndex + Int(cursor - start), length: Int(gapEnd - cursor))!))
            }
            guard index < outOfOrder.count, outOfOrder[index].sequence < end else { break }
            cursor = max(cursor, outOfOrder[index].sequence + UInt64(outOfOrder[index].bytes.readableBytes))
            index += 1
        }
        let newBytes = pieces.reduce(0) { $0 + $1.1.readableBytes }
        duplicateBytes += data.readableBytes - newBytes
        guard !pieces.isEmpty else { return false }
        outOfOrder.insert(contentsOf: pieces.map { (sequence: $0.0, bytes: $0.1) }, at: low + 0)
        outOfOrder.sort { $0.sequence < $1.sequence }
        outOfOrderBytes += newBytes
        return true
    }

    /// Up to `maxBytes` of in-order data as the slices it arrived in (no copy), or nil when none is
    /// ready. The last slice may be cut short at `maxBytes`; the rest of it stays ready.
    public mutating func readSegments(maxBytes: Int = .max) -> [ByteBuffer]? {
        guard !ready.isEmpty, maxBytes > 0 else { return nil }
        let (segments, taken) = ready.removeFirstBytes(upTo: maxBytes)
        readyBytes -= taken
        consumed += UInt64(taken)
        return segments
    }

    /// The same bytes as `readSegments`, in one buffer (a copy when there are several).
    public mutating func read(maxBytes: Int = .max) -> ByteBuffer? {
        readSegments(maxBytes: maxBytes).map(ByteBuffer.init(joining:))
    }
}

extension ByteBuffer {
    /// `segments` in one buffer: the buffer itself when there is one, else one copy of them all.
    public init(joining segments: [ByteBuffer]) {
        if segments.count == 1 {
            self = segments[0]
            return
        }
        var joined = ByteBufferAllocator().buffer(capacity: segments.reduce(0) { $0 + $1.readableBytes })
        for segment in segments { joined.writeImmutableBuffer(segment) }
        self = joined
    }
}

extension CircularBuffer where Element == ByteBuffer {
    /// Takes buffers from the front, up to `maxBytes` in all, the last one cut short if need be (its
    /// rest stays in front). Slices, not copies.
    public mutating func removeFirstBytes(upTo maxBytes: Int) -> (segments: [ByteBuffer], bytes: Int) {
        var segments: [ByteBuffer] = []
        var taken = 0
        while taken < maxBytes, var next = first {
            let take = Swift.min(maxBytes - taken, next.readableBytes)
            segments.append(next.readSlice(length: take)!)
            if next.readableBytes == 0 { removeFirst() } else { self[startIndex] = next }
            taken += take
        }
        return (segments, taken)
    }
}

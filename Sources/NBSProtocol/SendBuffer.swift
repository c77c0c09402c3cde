import NIOCore

public struct SubflowID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "sf\(rawValue)" }
}

/// The sender's side of the data sequence space: bytes the application wrote that the peer has not
/// acknowledged at the data level. Each sent segment remembers its subflow, so the data of a subflow
/// that dies can be sent again on the others.
public struct SendBuffer: Sendable {
    public struct Segment: Sendable, Equatable {
        public var sequence: UInt64
        public var length: Int
        public var subflow: SubflowID
        public var needsReinjection: Bool
        /// Where this transmission ended in its subflow's own count of DATA payload bytes sent
        /// (`sentOnSubflow`): once the peer reports having received that many on the subflow, the
        /// segment is there, whatever the cumulative acknowledgement says.
        public var subflowEnd: UInt64
        public var end: UInt64 { sequence + UInt64(length) }
    }

    public struct Transmission: Sendable {
        public var sequence: UInt64
        public var payload: ByteBuffer
        public var isReinjection: Bool
    }

    private var chunks = CircularBuffer<(start: UInt64, bytes: ByteBuffer)>()
    private var inFlight = CircularBuffer<Segment>()
    private var reinjectionCount = 0
    /// Sequences of segments marked for reinjection, in the order they were marked. Entries whose
    /// segment was acknowledged or sent again since are skipped when they come up.
    private var reinjectionQueue = CircularBuffer<UInt64>()
    /// DATA payload bytes put on each subflow (new data, reinjections and copies alike), and how
    /// many of them the peer reports having received there. A TCP subflow delivers in order, so
    /// the report covers a prefix of what was sent on it: data the peer holds beyond a gap in the
    /// stream, which the cumulative acknowledgement cannot show, is not sent again when its
    /// subflow goes (over a link that failed, 150-190 kB of 230-320 kB reinjected had already
    /// arrived: BENCHMARKS.md).
    private var sentOnSubflow: [SubflowID: UInt64] = [:]
    private var receivedOnSubflow: [SubflowID: UInt64] = [:]
    /// Every byte below this has been acknowledged by the peer.
    public private(set) var acknowledged: UInt64 = 0
    /// First byte never sent.
    public private(set) var nextNew: UInt64 = 0
    /// One past the last byte the application wrote.
    public private(set) var end: UInt64 = 0
    public let capacity: Int

    public init(capacity: Int) { self.capacity = capacity }

    public var bufferedBytes: Int { Int(end - acknowledged) }
    public var freeSpace: Int { max(0, capacity - bufferedBytes) }
    public var hasReinjectionPending: Bool { reinjectionCount > 0 }
    public var pendingReinjectionBytes: Int { inFlight.reduce(0) { $1.needsReinjection ? $0 + $1.length : $0 } }
    public var unsentBytes: Int { Int(end - nextNew) }
    public var inFlightSegments: Int { inFlight.count }

    /// The caller enforces `capacity` (by not completing writes); the buffer itself never refuses
    /// what the application already handed over.
    public mutating func append(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0 else { return }
        chunks.append((end, bytes))
        end += UInt64(bytes.readableBytes)
    }

    public enum AcknowledgeError: Error, Equatable { case beyondSent(ack: UInt64, sent: UInt64) }

    /// Returns the number of bytes newly acknowledged. Stale acks (reordered across subflows) are
    /// harmless; an ack of bytes never sent is a protocol violation.
    @discardableResult
    public mutating func acknowledge(upTo ack: UInt64) throws(AcknowledgeError) -> Int {
        guard ack <= nextNew else { throw .beyondSent(ack: ack, sent: nextNew) }
        guard ack > acknowledged else { return 0 }
        let freed = Int(ack - acknowledged)
        acknowledged = ack
        while let first = inFlight.first, first.sequence < ack {
            if first.end <= ack {
                if first.needsReinjection { reinjectionCount -= 1 }
                inFlight.removeFirst()
            } else {
                let cut = Int(ack - first.sequence)
                inFlight[inFlight.startIndex].sequence = ack
                inFlight[inFlight.startIndex].length -= cut
                break
            }
        }
        if inFlight.isEmpty { forgetGoneSubflows() }
        while let first = chunks.first, first.start < ack {
            let chunkEnd = first.start + UInt64(first.bytes.readableBytes)
            if chunkEnd <= ack {
                chunks.removeFirst()
            } else {
                chunks[chunks.startIndex].bytes.moveReaderIndex(forwardBy: Int(ack - first.start))
                chunks[chunks.startIndex].start = ack
                break
            }
        }
        return freed
    }

    public enum ReceptionReportError: Error, Equatable { case beyondSent(reported: UInt64, sent: UInt64) }

    /// The peer's report of the DATA payload bytes it received on `subflow` (an ordered one: TCP).
    /// Older reports, overtaken on the way, change nothing; more than was sent there is a
    /// protocol violation.
    public mutating func peerReceived(_ bytes: UInt64, on subflow: SubflowID) throws(ReceptionReportError) {
        let sent = sentOnSubflow[subflow] ?? 0
        guard bytes <= sent else { throw .beyondSent(reported: bytes, sent: sent) }
        if bytes > receivedOnSubflow[subflow] ?? 0 { receivedOnSubflow[subflow] = bytes }
    }

    /// What the peer last reported having received on `subflow` (0 before any report).
    public func peerReceived(on subflow: SubflowID) -> UInt64 { receivedOnSubflow[subflow] ?? 0 }

    /// DATA payload bytes put on `subflow` so far (the count `peerReceived` is compared with).
    public func sentBytes(on subflow: SubflowID) -> UInt64 { sentOnSubflow[subflow] ?? 0 }

    /// Copies of segments sent on `subflow` outside `nextTransmission` (`headOfLine`) count in its
    /// total like anything else, or the peer's reports would not line up with the segments.
    public mutating func noteCopies(_ bytes: Int, on subflow: SubflowID) {
        sentOnSubflow[subflow, default: 0] += UInt64(bytes)
    }

    /// The peer holds this segment, by its report for the subflow that sent it.
    private func peerHolds(_ segment: Segment) -> Bool {
        segment.subflowEnd <= receivedOnSubflow[segment.subflow] ?? 0
    }

    /// Subflows gone, whose counts only matter while their segments are in flight.
    private var goneSubflows: Set<SubflowID> = []

    /// `subflow` will send nothing more; its counts go once nothing it sent is in flight.
    public mutating func subflowGone(_ subflow: SubflowID) {
        goneSubflows.insert(subflow)
        if !inFlight.contains(where: { $0.subflow == subflow }) { forgetGoneSubflows() }
    }

    private mutating func forgetGoneSubflows() {
        guard !goneSubflows.isEmpty else { return }
        let held = Set(inFlight.map(\.subflow))
        for id in goneSubflows where !held.contains(id) {
            sentOnSubflow[id] = nil
            receivedOnSubflow[id] = nil
            goneSubflows.remove(id)
        }
    }

    /// Marks everything in flight on `subflow` for sending again, but what the peer reported it
    /// holds; returns how many bytes. The oldest segment goes again even when held (see
    /// `resendOldestHeld`).
    @discardableResult
    public mutating func reinject(from subflow: SubflowID) -> Int {
        var bytes = 0
        let oldest = inFlight.startIndex
        for i in inFlight.indices where inFlight[i].subflow == subflow && !inFlight[i].needsReinjection && (i == oldest || !peerHolds(inFlight[i])) {
            bytes += markForReinjection(i)
        }
        return bytes
    }

    /// Part of what `subflow` carried was lost (a UDP subflow found it from its acknowledgements):
    /// it is sent again on whichever subflow the scheduler picks next. Returns the bytes queued:
    /// 0 when they were acknowledged, or sent again elsewhere, in the meantime.
    @discardableResult
    public mutating func markLost(sequence: UInt64, length: Int, on subflow: SubflowID) -> Int {
        let end = sequence + UInt64(length)
        guard end > acknowledged, !inFlight.isEmpty else { return 0 }
        var bytes = 0
        var index = firstSegment(endingAfter: sequence)
        while index < inFlight.endIndex, inFlight[index].sequence < end {
            if inFlight[index].subflow == subflow, !inFlight[index].needsReinjection {
                bytes += markForReinjection(index)
            }
            index = inFlight.index(after: index)
        }
        return bytes
    }

    /// The oldest segment in flight, when the peer reported holding it: marked to go again; returns
    /// its bytes (0 when it is not held, or already marked). A peer acknowledges what it already
    /// acknowledged only when a duplicate arrives (`SessionCore.receiveData`), and a DATA_ACK lost
    /// with its subflow would otherwise leave both ends waiting: the sender for the ack of data it
    /// knows arrived, the peer for data beyond a window that ack would have opened (the soak, seed
    /// 708235496: two sessions of 200 stuck until their timeout).
    public mutating func resendOldestHeld() -> Int {
        guard let first = inFlight.first, !first.needsReinjection, peerHolds(first) else { return 0 }
        return markForReinjection(inFlight.startIndex)
    }

    /// Queues the segment at `index` to go out again; returns its length.
    private mutating func markForReinjection(_ index: CircularBuffer<Segment>.Index) -> Int {
        inFlight[index].needsReinjection = true
        reinjectionCount += 1
        reinjectionQueue.append(inFlight[index].sequence)
        return inFlight[index].length
    }

    /// What the peer waits for first, when `subflow` carries it: the oldest unacknowledged segment
    /// the peer has not reported holding, and the later such ones on the same subflow, up to
    /// `maxBytes`, as slices to send once more elsewhere. The segments stay where they are (this is
    /// a copy, not a reinjection). Empty when that oldest segment is on another subflow or already
    /// marked for reinjection.
    public func headOfLine(on subflow: SubflowID, maxBytes: Int) -> [Transmission] {
        guard let oldest = inFlight.first(where: { !peerHolds($0) }), oldest.subflow == subflow, !oldest.needsReinjection else { return [] }
        var copies: [Transmission] = []
        var bytes = 0
        for segment in inFlight where segment.subflow == subflow && !segment.needsReinjection && !peerHolds(segment) {
            guard bytes < maxBytes else { break }
            let length = min(segment.length, maxBytes - bytes)
            copies.append(Transmission(sequence: segment.sequence, payload: slice(segment.sequence, length), isReinjection: true))
            bytes += length
        }
        return copies
    }

    /// Binary search: segments are in sequence order; the first one that ends after `sequence`.
    private func firstSegment(endingAfter sequence: UInt64) -> CircularBuffer<Segment>.Index {
        var low = 0
        var high = inFlight.count
        while low < high {
            let mid = (low + high) / 2
            if inFlight[inFlight.index(inFlight.startIndex, offsetBy: mid)].end <= sequence { low = mid + 1 } else { high = mid }
        }
        return inFlight.index(inFlight.startIndex, offsetBy: low)
    }

    /// The oldest marked segment still waiting to be sent again, in O(log n) per entry rather than
    /// a scan of the flight (a UDP subflow marks segments one datagram at a time).
    private mutating func nextReinjection() -> CircularBuffer<Segment>.Index? {
        while let sequence = reinjectionQueue.popFirst() {
            let index = firstSegment(endingAfter: sequence)
            // A segment cut at the front by an acknowledgement starts later than it was marked.
            if index < inFlight.endIndex, inFlight[index].sequence <= max(sequence, acknowledged), inFlight[index].needsReinjection { return index }
        }
        return inFlight.firstIndex { $0.needsReinjection }
    }

    /// The next segment to put on `subflow`: data awaiting reinjection first, then new data below
    /// `windowEdge` (the peer's acknowledged sequence plus its window).
    public mutating func nextTransmission(on subflow: SubflowID, maxLength: Int, windowEdge: UInt64) -> Transmission? {
        if reinjectionCount > 0, var i = nextReinjection() {
            // Cut to the new subflow's segment size: a UDP receiver takes a segment only whole, and
            // 64 KiB made for a fast path is 50 ms on a 10 Mbit/s one.
            if inFlight[i].length > maxLength {
                var rest = inFlight[i]
                rest.sequence += UInt64(maxLength)
                rest.length -= maxLength
                inFlight[i].length = maxLength
                let offset = inFlight.distance(from: inFlight.startIndex, to: i)
                inFlight.insert(rest, at: inFlight.index(after: i))
                i = inFlight.index(inFlight.startIndex, offsetBy: offset)  // insert invalidates indices
                reinjectionQueue.prepend(rest.sequence)
                reinjectionCount += 1
            }
            inFlight[i].needsReinjection = false
            inFlight[i].subflow = subflow
            inFlight[i].subflowEnd = countSent(inFlight[i].length, on: subflow)
            reinjectionCount -= 1
            let segment = inFlight[i]
            return Transmission(sequence: segment.sequence, payload: slice(segment.sequence, segment.length), isReinjection: true)
        }
        guard nextNew < end, nextNew < windowEdge else { return nil }
        let (chunkIndex, offset) = locate(nextNew)
        let chunk = chunks[chunkIndex]
        let length = min(maxLength, chunk.bytes.readableBytes - offset, Int(clamping: windowEdge - nextNew))
        let payload = chunk.bytes.getSlice(at: chunk.bytes.readerIndex + offset, length: length)!
        let segment = Segment(sequence: nextNew, length: length, subflow: subflow, needsReinjection: false,
                              subflowEnd: countSent(length, on: subflow))
        inFlight.append(segment)
        nextNew += UInt64(length)
        return Transmission(sequence: segment.sequence, payload: payload, isReinjection: false)
    }

    private mutating func countSent(_ length: Int, on subflow: SubflowID) -> UInt64 {
        let total = (sentOnSubflow[subflow] ?? 0) + UInt64(length)
        sentOnSubflow[subflow] = total
        return total
    }

    /// Segments never cross a chunk boundary, so a segment is always one zero-copy slice.
    private func slice(_ sequence: UInt64, _ length: Int) -> ByteBuffer {
        let (chunkIndex, offset) = locate(sequence)
        let chunk = chunks[chunkIndex]
        return chunk.bytes.getSlice(at: chunk.bytes.readerIndex + offset, length: length)!
    }

    private func locate(_ sequence: UInt64) -> (CircularBuffer<(start: UInt64, bytes: ByteBuffer)>.Index, Int) {
        // Binary search: the chunk with the greatest start <= sequence.
        var low = 0
        var high = chunks.count - 1
        while low < high {
            let mid = (low + high + 1) / 2
            if chunks[chunks.index(chunks.startIndex, offsetBy: mid)].start <= sequence { low = mid } else { high = mid - 1 }
        }
        let index = chunks.index(chunks.startIndex, offsetBy: low)
        return (index, Int(sequence - chunks[index].start))
    }

    /// Bytes in flight per subflow, for statistics and tests.
    public func inFlightBytes(on subflow: SubflowID) -> Int {
        inFlight.reduce(0) { $1.subflow == subflow && !$1.needsReinjection ? $0 + $1.length : $0 }
    }
}

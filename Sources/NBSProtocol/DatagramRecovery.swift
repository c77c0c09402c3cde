import NIOCore

/// Loss recovery and congestion control of one UDP subflow, after RFC 9002 (QUIC): an RTT
/// estimator, NewReno in bytes, a pacer, and the receiver's record of packet numbers.
/// Times are nanoseconds on any monotonic clock; nothing here reads a clock.

public struct RTTEstimator: Sendable, Equatable {
    public static let initialRTT: UInt64 = 100_000_000
    public private(set) var latest: UInt64 = 0
    public private(set) var smoothed: UInt64 = RTTEstimator.initialRTT
    public private(set) var variation: UInt64 = RTTEstimator.initialRTT / 2
    public private(set) var minimum: UInt64 = .max
    public private(set) var hasSample = false

    public init() {}

    public mutating func add(sample: UInt64, ackDelay: UInt64) {
        latest = sample
        minimum = min(minimum, sample)
        // The peer's ack delay is not path time, unless subtracting it would go below the minimum.
        let adjusted = sample >= minimum + ackDelay ? sample - ackDelay : sample
        guard hasSample else {
            hasSample = true
            smoothed = adjusted
            variation = adjusted / 2
            return
        }
        let deviation = smoothed > adjusted ? smoothed - adjusted : adjusted - smoothed
        variation = (3 * variation + deviation) / 4
        smoothed = (7 * smoothed + adjusted) / 8
    }

    /// Probe timeout before backoff: RFC 9002 §6.2.1.
    public func probeTimeout(maxAckDelay: UInt64) -> UInt64 {
        smoothed + max(4 * variation, 1_000_000) + maxAckDelay
    }

    /// A packet sent this long before a later one was acknowledged is lost: RFC 9002 §6.1.2.
    public var lossDelay: UInt64 { max(max(latest, smoothed) * 9 / 8, 1_000_000) }
}

/// NewReno (RFC 9002 §7) with a pacer, so a UDP session takes no more than its share of a
/// bottleneck and does not send its window in one burst.
public struct NewReno: Sendable, Equatable {
    /// The subflow's datagram size (`PathMTUSearch.confirmed`): the unit of window growth and pacing.
    public internal(set) var maxDatagramSize: Int
    public private(set) var window: Int
    public private(set) var slowStartThreshold = Int.max
    public private(set) var bytesInFlight = 0
    /// Packets sent before this time belong to a loss already reacted to.
    private var recoveryStart: UInt64?
    /// Pacer: a token bucket refilled at 1.25 × window / RTT.
    private var tokens: Double
    private var lastRefill: UInt64?

    public init(maxDatagramSize: Int = DatagramWire.baseDatagramSize) {
        self.maxDatagramSize = maxDatagramSize
        window = 10 * maxDatagramSize
        tokens = Double(10 * maxDatagramSize)
    }

    public var minimumWindow: Int { 2 * maxDatagramSize }
    public var available: Int { max(0, window - bytesInFlight) }
    public var isInSlowStart: Bool { window < slowStartThreshold }

    public mutating func sent(bytes: Int, now: UInt64, rtt: RTTEstimator) {
        bytesInFlight += bytes
        refill(now: now, rtt: rtt)
        tokens -= Double(bytes)
    }

    public mutating func acknowledged(bytes: Int, sentAt: UInt64) {
        bytesInFlight = max(0, bytesInFlight - bytes)
        if let start = recoveryStart, sentAt <= start { return }
        if isInSlowStart {
            window += bytes
        } else {
            window += maxDatagramSize * bytes / max(window, 1)
        }
    }

    /// Lost packets leave the flight; the window halves once per round trip of losses.
    public mutating func lost(bytes: Int, sentAt: UInt64, now: UInt64) {
        bytesInFlight = max(0, bytesInFlight - bytes)
        if let start = recoveryStart, sentAt <= start { return }
        recoveryStart = now
        slowStartThreshold = max(window / 2, minimumWindow)
        window = slowStartThreshold
    }

    /// Packets no longer tracked without being acknowledged or lost (the subflow's keys made the
    /// handshake's packets moot, or the subflow closed).
    public mutating func discarded(bytes: Int) {
        bytesInFlight = max(0, bytesInFlight - bytes)
    }

    /// Persistent congestion (every packet over several probe timeouts lost): back to the minimum.
    public mutating func collapse() {
        window = minimumWindow
        recoveryStart = nil
    }

    public func pacingRate(rtt: RTTEstimator) -> Double {
        1.25 * Double(window) / (Double(max(rtt.smoothed, 1_000)) / 1e9)
    }

    private mutating func refill(now: UInt64, rtt: RTTEstimator) {
        let burst = Double(max(10 * maxDatagramSize, window / 8))
        if let last = lastRefill, now > last {
            tokens = min(burst, tokens + pacingRate(rtt: rtt) * Double(now - last) / 1e9)
        }
        lastRefill = now
    }

    /// When a datagram of `bytes` may leave; `now` or earlier means at once.
    public mutating func sendTime(bytes: Int, now: UInt64, rtt: RTTEstimator) -> UInt64 {
        refill(now: now, rtt: rtt)
        if tokens >= Double(bytes) || tokens >= Double(maxDatagramSize) { return now }
        let missing = Double(min(bytes, maxDatagramSize)) - tokens
        return now + UInt64(missing / pacingRate(rtt: rtt) * 1e9) + 1
    }
}

/// The packet numbers a receiver has seen, as ranges: what its ACKs report, and what it refuses
/// as a replay. Bounded: the oldest ranges are forgotten, and anything below them refused.
public struct ReceivedPackets: Sendable, Equatable {
    /// Disjoint, newest first.
    public private(set) var ranges: [ClosedRange<UInt64>] = []
    /// Packet numbers below this are refused, having been forgotten.
    public private(set) var floor: UInt64 = 0
    public let maxRanges: Int

    public init(maxRanges: Int = DatagramWire.maxAckRanges) { self.maxRanges = maxRanges }

    public var largest: UInt64? { ranges.first?.upperBound }

    public func contains(_ pn: UInt64) -> Bool {
        pn < floor || ranges.contains { $0.contains(pn) }
    }

    /// Records `pn`; false if it was seen before (or is too old to tell), which makes it a replay.
    public mutating func insert(_ pn: UInt64) -> Bool {
        guard !contains(pn) else { return false }
        let index = ranges.firstIndex { $0.upperBound < pn } ?? ranges.count
        // Joins the range just above (newer) and/or just below (older).
        let joinsNewer = index > 0 && ranges[index - 1].lowerBound == pn + 1
        let joinsOlder = index < ranges.count && ranges[index].upperBound + 1 == pn
        switch (joinsNewer, joinsOlder) {
        case (true, true):
            ranges[index - 1] = ranges[index].lowerBound...ranges[index - 1].upperBound
            ranges.remove(at: index)
        case (true, false):
            ranges[index - 1] = pn...ranges[index - 1].upperBound
        case (false, true):
            ranges[index] = ranges[index].lowerBound...pn
        case (false, false):
            ranges.insert(pn...pn, at: index)
        }
        while ranges.count > maxRanges {
            let dropped = ranges.removeLast()
            floor = max(floor, dropped.upperBound + 1)
        }
        return true
    }
}

/// Packets awaiting acknowledgement, indexed by packet number: acknowledging a range costs the
/// packets it acknowledges (and the holes of losses not yet declared), not the whole flight.
struct SentPackets<Packet> {
    private var slots = CircularBuffer<Packet?>()
    /// Packet number of `slots.first`.
    private var first: UInt64 = 0
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    /// Packet numbers only grow; the ones not tracked (bare ACKs) leave empty slots.
    mutating func append(_ packet: Packet, number: UInt64) {
        if slots.isEmpty { first = number }
        while first + UInt64(slots.count) < number { slots.append(nil) }
        slots.append(packet)
        count += 1
    }

    /// Removes and returns the packets numbered in `range`.
    @discardableResult
    mutating func remove(_ range: ClosedRange<UInt64>) -> [Packet] {
        guard !slots.isEmpty, range.upperBound >= first else { return [] }
        let last = first + UInt64(slots.count) - 1
        guard range.lowerBound <= last else { return [] }
        var removed: [Packet] = []
        for number in max(range.lowerBound, first)...min(range.upperBound, last) {
            if let packet = take(at: slots.index(slots.startIndex, offsetBy: Int(number - first))) { removed.append(packet) }
        }
        trimFront()
        return removed
    }

    private mutating func take(at index: CircularBuffer<Packet?>.Index) -> Packet? {
        guard let packet = slots[index] else { return nil }
        slots[index] = nil
        count -= 1
        return packet
    }

    /// The first slot always holds a packet, so that `first` is the oldest one awaiting its ACK.
    private mutating func trimFront() {
        while let head = slots.first, head == nil {
            slots.removeFirst()
            first += 1
        }
    }

    /// The oldest packet still awaiting its acknowledgement.
    var oldest: Packet? { slots.first ?? nil }

    /// Packets still awaiting acknowledgement numbered below `number`, oldest first.
    func packets(below number: UInt64) -> [Packet] {
        var result: [Packet] = []
        var pn = first
        for slot in slots {
            guard pn < number else { break }
            if let packet = slot { result.append(packet) }
            pn += 1
        }
        return result
    }

    mutating func removeAll(where shouldRemove: (Packet) -> Bool) -> [Packet] {
        var removed: [Packet] = []
        for index in slots.indices {
            if let packet = slots[index], shouldRemove(packet), let taken = take(at: index) { removed.append(taken) }
        }
        trimFront()
        return removed
    }
}

/// Packetization-layer path MTU discovery for a UDP subflow (RFC 8899, as QUIC does it, RFC 9000
/// §14.3). A subflow starts at `DatagramWire.baseDatagramSize`, which every IPv6 path carries, and
/// probes larger sizes with a PING padded to the size. A size counts only once a probe of it is
/// acknowledged, so it needs neither ICMP (often filtered) nor the peer's word: a probe lost on a
/// path with a smaller MTU, or cut short by a peer whose buffers are smaller, simply goes
/// unanswered. Probes are outside congestion control and loss recovery: a lost one is neither a
/// congestion signal nor a sign that the path is dead.
///
/// A path whose MTU shrinks under a subflow is not detected; the subflow's datagrams are then lost
/// until the session's stall check replaces it with a new subflow, which starts at the base again.
public struct PathMTUSearch: Sendable, Equatable {
    /// The largest size acknowledged so far (the base until then).
    public private(set) var confirmed: Int
    /// Sizes still to try, largest first, each above `confirmed`.
    public private(set) var candidates: [Int] = []
    struct Probe: Sendable, Equatable {
        var number: UInt64
        var size: Int
        var sentAt: UInt64
    }
    private var probe: Probe?
    /// The last probe given up for lost: an ACK of it may still come, late (the ACK, not the
    /// probe, was lost, or only delayed), and proves the size as well as a timely one.
    private var lateProbe: Probe?
    private var losses = 0
    private var lossesExcused = 0
    /// A size is given up after this many of its probes went unanswered: one loss may be chance.
    public static let probesPerSize = 3
    /// A probe lost while the subflow's own packets were being lost too is more likely the queue's
    /// doing than the size's (a saturated 10 Mbit/s tbf path gave up 1,472 that way): it is tried
    /// again without counting, this many times per size.
    public static let excusedLossesPerSize = 5

    public init(base: Int = DatagramWire.baseDatagramSize) {
        confirmed = base
    }

    /// Adds sizes to try (those not above the confirmed size, or beyond what any receiver accepts,
    /// are ignored).
    public mutating func consider(_ sizes: [Int]) {
        let fresh = sizes.filter { $0 > confirmed && $0 <= DatagramWire.largestDatagramSize }
        candidates = Set(candidates + fresh).sorted(by: >)
    }

    /// The size to probe now, if any: one probe at a time.
    public var sizeToProbe: Int? { probe == nil ? candidates.first : nil }

    public var isProbing: Bool { probe != nil }

    public mutating func sent(number: UInt64, size: Int, at now: UInt64) {
        probe = Probe(number: number, size: size, sentAt: now)
    }

    /// An ACK's ranges: the newly confirmed size if they cover the probe. A probe that three later
    /// packets overtook is lost, as RFC 9002 counts a packet lost.
    /// `congested`: packets of the subflow sent since the probe were lost too.
    public mutating func acknowledged(_ ranges: [ClosedRange<UInt64>], congested: Bool = false) -> Int? {
        for acknowledged in [probe, lateProbe].compactMap({ $0 }) where acknowledged.size > confirmed {
            guard ranges.contains(where: { $0.contains(acknowledged.number) }) else { continue }
            confirmed = acknowledged.size
            candidates.removeAll { $0 <= confirmed }
            if let probe, probe.size <= confirmed { self.probe = nil }
            lateProbe = nil
            (losses, lossesExcused) = (0, 0)
            return confirmed
        }
        if let probe, let newest = ranges.first?.upperBound, newest >= probe.number + 3 { lost(congested: congested) }
        return nil
    }

    /// When the probe in flight counts as lost if still unanswered.
    public func deadline(probeTimeout: UInt64) -> UInt64? {
        probe.map { $0.sentAt + probeTimeout }
    }

    public mutating func expire(now: UInt64, probeTimeout: UInt64, congested: Bool = false) {
        guard let deadline = deadline(probeTimeout: probeTimeout), now >= deadline else { return }
        lost(congested: congested)
    }

    private mutating func lost(congested: Bool) {
        guard let probe else { return }
        self.probe = nil
        lateProbe = probe
        if congested, lossesExcused < Self.excusedLossesPerSize {
            lossesExcused += 1
            return
        }
        losses += 1
        if losses >= Self.probesPerSize {
            candidates.removeAll { $0 == probe.size }
            (losses, lossesExcused) = (0, 0)
        }
    }

    /// What to try on a path whose first hop has `linkMTU` (the kernel's route MTU, `IP_MTU`): the
    /// largest datagram that hop carries, then what an Ethernet path of 1,500 carries (the usual
    /// bottleneck beyond a larger first hop), then 1,400 (tunnels and PPPoE take a little off).
    public static func candidates(linkMTU: Int, ipv6: Bool) -> [Int] {
        let headers = (ipv6 ? 40 : 20) + 8
        let largest = linkMTU - headers
        return Set([largest, 1500 - headers, 1400]).filter { $0 <= largest && $0 > DatagramWire.baseDatagramSize }.sorted(by: >)
    }
}

import NBSNetlink
import NBSProtocol
import NIOCore
import NIOPosix

public typealias MultipathPolicy = NBSProtocol.MultipathPolicy

/// Options for `NBS.open` and `NBS.listen`.
public struct NBSOptions: Sendable {
    /// What each subflow runs on. Both give the application the same reliable, ordered stream,
    /// names, events, policies and mobility; both ends of a session must use the same.
    public var transport: Transport = .tcp
    public var policy: MultipathPolicy = .aggregate
    /// Under `aggregate`, of the subflows between the same two interfaces (an IPv4 and an IPv6
    /// subflow over one path) one carries data and the others stand by, taking over at once if it
    /// fails: two flows through one bottleneck only compete and lose there. Each end names its
    /// interface per subflow (INTERFACE, docs/PROTOCOL.md). false: every subflow carries data.
    public var siblingSubflowsStandBy = true
    /// Most subflows a session runs (and, on a listener, accepts per session).
    public var maxSubflows = 4
    public var resolver: any NameResolver = SystemResolver()
    /// Local addresses to open subflows from. nil: the host's usable addresses, read at open.
    public var localAddresses: [SocketAddress]?
    public var eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    public var connectTimeout: TimeAmount = .seconds(5)
    /// An open tries its pairs of addresses one after another (`PathPlanner.openAttempts`), but
    /// does not wait out an attempt that has not reached the peer within this long: the next pair's
    /// starts beside it (Happy Eyeballs' Connection Attempt Delay, RFC 8305, whose 250 ms this
    /// takes). Over TCP the first connection up carries the OPEN; over UDP the first ACCEPT goes on
    /// to the verdict; a plain TCP open's first connection up is the session (and the UDP floor
    /// does not apply to it). A path that is silently dead then costs this instead of `connectTimeout` or
    /// `handshakeTimeout`. nil: strictly one pair at a time; zero: every pair at once. Over UDP
    /// it is at least `udpOpenAttemptDelayFloor`.
    public var openAttemptDelay: TimeAmount? = .milliseconds(250)
    /// Over UDP what answers a hello is the listener's application, not its kernel, so a loaded
    /// listener looks like a dead path: in the soak's burst of 200 opens over UDP, 13-24 % of them
    /// started a second hello at 250 ms, more work for a listener already behind. At 1 s (the
    /// hello sent a third time) a path is far likelier dead than slow.
    public static let udpOpenAttemptDelayFloor: TimeAmount = .seconds(1)

    var effectiveOpenAttemptDelay: TimeAmount? {
        guard transport == .udp, let delay = openAttemptDelay, delay > .zero else { return openAttemptDelay }
        return max(delay, Self.udpOpenAttemptDelayFloor)
    }
    /// TCP Fast Open (RFC 7413) on TCP subflows: a listener accepts OPEN and JOIN in the SYN, and an
    /// opener that holds the server's cookie (from any earlier connection to that address) sends
    /// them there, so an open takes one round trip instead of two. The kernel decides: a listener
    /// needs `net.ipv4.tcp_fastopen` with bit 2 set (3, say), an opener bit 1 (Linux's default);
    /// without them, or without a cookie, the connection is a plain one. An OPEN in a SYN can be
    /// replayed by the network, as any Fast Open data: the listener answers a replayed one with an
    /// ACCEPT the opener never asked for, and that connection is reset.
    public var tcpFastOpen = true
    /// The least retransmission timeout of this end's TCP subflows (Linux's `TCP_RTO_MIN_US`, 6.15
    /// and later; an older kernel refuses it and keeps its own, 200 ms). The kernel still waits at
    /// least its estimate from the path's RTT and variation; the floor matters on paths whose
    /// round trip is short, where a lost tail or retransmission otherwise holds the session's head
    /// of line for 200 ms or more. With 50 ms on 10 Mbit/s paths, a link going down left no gap of
    /// 100 ms or more in 28 of 30 trials (24 of 30 without), and a blackhole's stall was 155–251 ms
    /// (192–384); but 20+5 Mbit/s aggregation had one run of 7 at 82 % and longer head-of-line
    /// stalls, the slow path's queue most likely setting off early timeouts (BENCHMARKS.md). So it
    /// is not on by default. nil: the kernel's.
    public var tcpMinimumRTO: TimeAmount? = nil
    /// How long a new subflow may take to complete OPEN/ACCEPT or JOIN. An opener's TCP Fast Open
    /// connect returns before its SYN leaves, so `connectTimeout` is added to it then.
    public var handshakeTimeout: TimeAmount = .seconds(5)
    /// How long `close()` waits for the peer's DATA_FIN and acknowledgements before aborting (or
    /// closing, when only the acknowledgement of our DATA_FIN is missing: `Session.close()`).
    public var closeTimeout: TimeAmount = .seconds(30)
    public var probeInterval: TimeAmount = .seconds(1)
    /// Follows interfaces and addresses: subflows on a lost address or interface are retired at
    /// once, new addresses are joined and announced. nil: the local addresses read at open, fixed.
    public var interfaceMonitor: (any InterfaceMonitor)? = SharedInterfaceMonitor.instance
    /// With every path lost, the session waits this long for one to come back before failing.
    public var waitingGracePeriod: TimeAmount = .seconds(60)
    /// While waiting, the opener re-resolves the peer's name and tries to JOIN this often.
    public var rejoinInterval: TimeAmount = .milliseconds(500)
    /// A subflow with data in flight, a TCP timeout retransmission and no acknowledgement for
    /// max(this, 2 RTT) is suspended (a blackhole: no netlink event will come) and its data
    /// reinjected on the others.
    public var minimumStallTimeout: TimeAmount = .milliseconds(200)
    /// How much of its own rate each subflow may queue beyond what TCP has in flight.
    public var queueTarget: TimeAmount = .milliseconds(10)
    /// A stalled subflow that gets no acknowledgement for this long after being suspended is closed.
    public var stallRetirement: TimeAmount = .seconds(3)
    /// How often subflows are checked for stalls while session data is unacknowledged.
    public var livenessInterval: TimeAmount = .milliseconds(50)
    /// How often they are checked while only probes are in flight or a suspended subflow waits for
    /// an acknowledgement (never more often than `livenessInterval`).
    public var idleLivenessInterval: TimeAmount = .milliseconds(500)
    public var sendBufferCapacity = 8 * 1024 * 1024
    public var receiveCapacity = 8 * 1024 * 1024
    public var maxSegmentSize = 64 * 1024
    /// Listener only: sessions handed out by `accept()` are queued up to this many; more are refused.
    public var acceptBacklog = 1024
    /// Listener only: addresses to bind. nil: the IPv6 wildcard (dual-stack), else IPv4's.
    public var bindAddresses: [SocketAddress]?
    /// Sessions whose peer's name is verified below this are refused on both ends, before the
    /// application sees them (docs/SECURITY.md).
    public var requiredPeerVerification: PeerVerification = .claimed
    /// This host's Ed25519 identity, proven to every peer in the handshake. With it, this host's
    /// self-certifying name (`identity.selfCertifyingName`) can be its local name.
    public var identity: NBSIdentity?
    /// Peers' names and the Ed25519 public keys they must prove: such a peer is keyVerified, and
    /// one that claims the name without proving the key is refused.
    public var pinnedKeys: [String: [UInt8]] = [:]
    /// Listener only: look the opener's claimed name up (forward DNS) even when nothing above
    /// `claimed` is required, so sessions can report `dnsConfirmed`. Off by default, as sshd's
    /// UseDNS is: each lookup delays admission and queries the resolver for a name a stranger chose.
    /// Requiring `dnsConfirmed` looks names up regardless.
    public var lookUpPeerNames = false
    /// How long the listener waits for the forward lookup of a peer's name; no answer in time
    /// leaves the name `claimed`.
    public var nameVerificationTimeout: TimeAmount = .seconds(2)
    /// Listener only: forward lookups of openers' names in progress at once; more openers are
    /// refused, so that OPENs with names that resolve slowly cannot pile up lookups and state.
    /// (Handshakes without a lookup are bounded by maxPendingHandshakes.)
    public var maxPendingVerifications = 64
    /// Listener only: connections that have not sent OPEN or JOIN yet (each held at most
    /// handshakeTimeout); more are refused at once, so a flood of idle connections cannot grow the
    /// listener's tables.
    public var maxPendingHandshakes = 1024
    /// Listener only: a client that does not start with the NBS preamble becomes a legacy session
    /// (true), so plain TCP clients keep working; false closes such connections.
    public var acceptLegacyClients = true
    /// Listener: how long a new connection may stay silent before it is taken for a legacy client
    /// waiting for the server to speak first (NBS openers send their preamble at once). Opener with
    /// `.fallback`: the least time a silent server is given to answer OPEN, counted from the
    /// connection being up (at least 4 times the TCP connect time, so that a slow path is not
    /// mistaken for a legacy server).
    public var legacyDetectionDelay: TimeAmount = .seconds(1)
    /// Opener only: whether it may fall back to plain TCP for a peer that does not speak NBS.
    public var legacyFallback: LegacyFallback = .nbsOnly
    /// Opener only: peers found to be legacy, so `.fallback` skips NBS for them for a while.
    public var legacyPeers: LegacyPeerCache = .shared
    /// UDP: a datagram after this much silence on a subflow keeps NAT bindings (typically 30 s or
    /// more for UDP) open, and finds a dead path when nothing else is sent.
    public var keepaliveInterval: TimeAmount = .seconds(15)
    /// UDP listeners: datagrams from unknown sources that are not a well-formed, full-sized OPEN or
    /// JOIN are dropped; this bounds how many unfinished handshakes a flood can leave (on top of
    /// `maxPendingHandshakes`).
    public var maxDatagramSubflows = 65_536

    public init() {}

    public enum Transport: String, Sendable, CaseIterable, Codable {
        /// One TCP connection per subflow.
        case tcp
        /// One UDP flow per subflow, with the same frames in authenticated datagrams, per-subflow
        /// packet numbers and ACK ranges, NewReno congestion control with pacing, and lost data
        /// resent by the session on any subflow (docs/PROTOCOL.md, UDP subflows).
        case udp
    }

    /// Opener only: what to do with a peer that does not speak NBS (docs/PROTOCOL.md, Legacy peers).
    public enum LegacyFallback: String, Sendable, CaseIterable {
        /// Never fall back: such a peer fails the open with `NBSError.legacyPeer`.
        case nbsOnly = "nbs-only"
        /// Try NBS; for a peer that answers with other bytes, closes, or stays silent, go on as a
        /// plain TCP session, and remember the peer as legacy in `legacyPeers`.
        case fallback
        /// Plain TCP only: no NBS byte is ever sent.
        case legacyOnly = "legacy-only"
    }

    /// Test hook: after `after` sends, the next `count` sends of each UDP subflow an opener makes
    /// fail locally (EPERM, as under a firewall's drop rule), and SwiftNIO's closing of the socket
    /// is played out.
    var udpSendFailuresForTesting = (after: 0, count: 0)

    var coreConfiguration: SessionCore.Configuration {
        var c = SessionCore.Configuration()
        c.policy = policy
        c.maxSegmentSize = min(maxSegmentSize, NBSWire.maxDataPayload)
        c.sendBufferCapacity = sendBufferCapacity
        c.receiveCapacity = receiveCapacity
        return c
    }
}

public enum NBSError: Error, Sendable, Equatable, CustomStringConvertible {
    case invalidName(String)
    case nameResolutionFailed(name: String, reason: String)
    case noUsableAddressPairs(peer: String)
    case connectFailed(peer: String, reason: String)
    case refused(reason: CloseReason, message: String)
    case handshakeFailed(String)
    case allSubflowsLost
    case abortedByPeer(reason: CloseReason, message: String)
    case aborted(reason: CloseReason, message: String)
    case protocolViolation(String)
    case writeAfterFinish
    case closeTimedOut
    case listenerClosed
    case bindFailed(String)
    /// This side refused the peer: its name is not verified to `requiredPeerVerification`, or it
    /// claimed a pinned or self-certifying name without proving the key.
    case verificationFailed(peer: String, reason: String)
    /// The peer answered, but not in NBS (and fallback to plain TCP was not allowed).
    case legacyPeer(peer: String, evidence: String)
    /// A legacy session's connection ended without an end of stream (reset, or an error).
    case connectionLost(String)

    public var description: String {
        switch self {
        case .invalidName(let n): "invalid name '\(n)'"
        case .nameResolutionFailed(let name, let reason): "cannot resolve '\(name)': \(reason)"
        case .noUsableAddressPairs(let peer): "no usable (local, remote) address pair of the same family for '\(peer)'"
        case .connectFailed(let peer, let reason): "cannot reach '\(peer)': \(reason)"
        case .refused(let reason, let message): "the peer refused the session: \(reason)\(message.isEmpty ? "" : ": \(message)")"
        case .handshakeFailed(let why): "handshake failed: \(why)"
        case .allSubflowsLost: "every subflow of the session was lost"
        case .abortedByPeer(let reason, let message): "the peer aborted the session: \(reason)\(message.isEmpty ? "" : ": \(message)")"
        case .aborted(let reason, let message): "session aborted: \(reason)\(message.isEmpty ? "" : ": \(message)")"
        case .protocolViolation(let why): "protocol violation: \(why)"
        case .writeAfterFinish: "write after the session was finished"
        case .closeTimedOut: "the peer did not finish the session in time"
        case .listenerClosed: "the listener is closed"
        case .bindFailed(let why): "cannot listen: \(why)"
        case .verificationFailed(let peer, let reason): "refused '\(peer)': \(reason)"
        case .legacyPeer(let peer, let evidence): "'\(peer)' does not speak NBS: \(evidence)"
        case .connectionLost(let why): "the connection was lost: \(why)"
        }
    }
}

public enum SubflowState: String, Sendable, Codable {
    case connecting
    case active
    /// No TCP progress: suspended from scheduling, its data reinjected elsewhere.
    case stalled
    case backup
    /// Established and probed, but carrying no data while a sibling between the same two
    /// interfaces does (`NBSOptions.siblingSubflowsStandBy`); it takes over when that one fails.
    case standby
    /// Being replaced by a better pair: it carries nothing new, and closes once what it carries
    /// has arrived.
    case draining
    case closed

    /// Established and not stalled: carrying data, or ready to.
    public var isUp: Bool { self == .active || self == .standby || self == .backup }
}

public struct SubflowInfo: Sendable, Equatable {
    public var id: UInt32
    public var local: SocketAddress
    public var remote: SocketAddress
    public var interface: String?
    public var state: SubflowState
    public var rttMilliseconds: Double?
    public var bytesSent: Int
    public var bytesReceived: Int
    public var reinjectedBytes: Int
    public var closeReason: String?
    /// A UDP subflow's datagram size: 1,200 bytes until its path MTU search confirms more.
    public var datagramSize: Int? = nil
}

public enum SessionEvent: Sendable, Equatable {
    case subflowUp(SubflowInfo)
    case subflowDown(SubflowInfo, reason: String)
    case subflowStalled(SubflowInfo, silentMilliseconds: Int)
    /// A UDP subflow's peer moved to another address or port without notice (a NAT rebinding),
    /// and answered a path check there.
    case subflowRebound(SubflowInfo, from: SocketAddress)
    /// Data of a lost subflow queued for sending again on the others.
    case reinjected(bytes: Int, from: UInt32)
    /// The peer announced (ADD_ADDR) or withdrew (REMOVE_ADDR) an address.
    case addressAnnounced(SocketAddress)
    case addressRemoved(SocketAddress)
    /// A new usable local address (netlink), announced to the peer and joined from.
    case localAddressAdded(SocketAddress, interface: String)
    /// A local address this session used or announced went away.
    case localAddressRemoved(SocketAddress)
    /// A local interface carrying subflows of this session went down or away.
    case interfaceDown(String)
    /// While waiting, the peer's name was resolved again and gave addresses not known before.
    case peerResolved(name: String, addresses: [SocketAddress])
    case waiting
    case resumed
    case closed
    case failed(NBSError)
}

extension SocketAddress {
    var hostString: String { ipAddress ?? description }
    var isLoopbackAddress: Bool {
        guard let ip = ipAddress else { return false }
        return ip.hasPrefix("127.") || ip == "::1"
    }
    var isLinkLocalAddress: Bool { (ipAddress?.lowercased().hasPrefix("fe80:")) ?? false }
    var familyIsIPv4: Bool { if case .v4 = self { true } else { false } }
    var familyIsIPv6: Bool { if case .v6 = self { true } else { false } }

    func sameFamily(_ other: SocketAddress) -> Bool {
        (familyIsIPv4 && other.familyIsIPv4) || (familyIsIPv6 && other.familyIsIPv6)
    }

    /// A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; report them as the IPv4 they are.
    var unmapped: SocketAddress {
        guard case .v6 = self, let ip = ipAddress, ip.lowercased().hasPrefix("::ffff:"), ip.contains("."),
            let v4 = try? SocketAddress(ipAddress: String(ip.dropFirst(7)), port: port ?? 0)
        else { return self }
        return v4
    }

    /// Whether a subflow may run from this local address to `remote`: same family, and loopback
    /// only with loopback.
    func canPair(with remote: SocketAddress) -> Bool {
        sameFamily(remote) && isLoopbackAddress == remote.isLoopbackAddress
    }

    func withPort(_ port: Int) -> SocketAddress {
        (try? SocketAddress(ipAddress: hostString, port: port)) ?? self
    }

    var wireAddress: WireAddress? {
        var bytes: [UInt8]
        switch self {
        case .v4(let a):
            bytes = withUnsafeBytes(of: a.address.sin_addr) { Array($0) }
        case .v6(let a):
            bytes = withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
        default:
            return nil
        }
        return WireAddress(bytes: bytes, port: UInt16(port ?? 0))
    }

    init?(_ wire: WireAddress) {
        var storage = ByteBuffer(bytes: wire.bytes)
        let packed = storage.readBytes(length: storage.readableBytes) ?? []
        guard let address = try? SocketAddress(packedIPAddress: ByteBuffer(bytes: packed), port: Int(wire.port)) else { return nil }
        self = address
    }
}

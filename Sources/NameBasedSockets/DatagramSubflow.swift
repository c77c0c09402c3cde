#if canImport(Glibc)
import Glibc
#endif
import Logging
import NBSProtocol
import NIOCore
import NIOPosix

/// Datagrams in, closures out: the whole pipeline of a UDP socket. The closures are cleared when
/// the subflow ends, which breaks the channel → handler → subflow cycle.
///
/// On a listener's shared socket it also records (`backlogLag`) the time the socket held more than
/// one wake-up's reads: acknowledgements that arrived meanwhile waited in the kernel's queue behind
/// the others, so for the subflows this socket carries that time is not a path's silence. Such a
/// socket falls behind when its loop cannot keep up rather than being blocked: with 10,000 sessions
/// closing at once and the clients on the same two cores, its queue stayed full for seconds while
/// every timer still ran on time, and the listener retired the subflows whose acknowledgements were
/// waiting there (1,015 sessions failed in one run). The record is the socket's, not the loop's: a
/// loop serves its other sockets in the same wake-ups, and when the backlog counted for the whole
/// loop, another listener's bulk transfer kept its socket behind for 3.4 s on end and a subflow of an
/// unrelated session on that loop, whose peer had gone silent, was not suspended for over 10 s. An
/// opener's socket carries one subflow, whose own acknowledgements are all that wait in it: it keeps
/// no record, since counting its backlog would hide its own path dying for as long as a download
/// keeps it busy.
final class DatagramInbound: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    var onDatagram: ((AddressedEnvelope<ByteBuffer>) -> Void)?
    var onReadComplete: (() -> Void)?
    var onError: ((any Error) -> Void)?
    var onInactive: (() -> Void)?
    /// A listener's shared socket only: when it was behind (see above).
    private(set) var backlogLag: LoopLag?
    private var readsInWakeup = 0
    private var backlog = ReadBacklog()

    init(sharedByListener: Bool) { backlogLag = sharedByListener ? LoopLag() : nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        readsInWakeup += 1
        onDatagram?(Self.unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if backlogLag != nil,
           let behind = backlog.wakeupEnded(reads: readsInWakeup, limit: DatagramSubflow.readsPerWakeup, now: DatagramSubflow.now) {
            backlogLag?.record(due: behind.start, ran: behind.end)
        }
        readsInWakeup = 0
        onReadComplete?()
    }
    /// UDP errors (an ICMP unreachable reported on a connected socket) do not close the socket:
    /// the subflow decides.
    func errorCaught(context: ChannelHandlerContext, error: any Error) { onError?(error) }
    func channelInactive(context: ChannelHandlerContext) { onInactive?() }

    func detach() {
        onDatagram = nil
        onReadComplete = nil
        onError = nil
        onInactive = nil
    }
}

/// One UDP subflow: a connected UDP socket per (local, remote) pair, and the pure
/// `DatagramConnection` that turns frames into datagrams and back. To the session engine it is a
/// `SubflowTransport` like a TCP connection.
///
/// The opener's socket is bound to its local address and connected to the listener's. A listener
/// hears new subflows on its wildcard socket (`DatagramListener`), then gives each one a socket of
/// its own, bound to the address the opener sent to (so replies leave from it, whatever the routing
/// table says) and connected to the opener. A datagram for a known subflow from a new source
/// address (a NAT rebinding) reaches the wildcard socket; if it authenticates and is the newest,
/// the listener checks the new path (PATH_CHALLENGE / PATH_RESPONSE) and then moves the subflow there.
final class DatagramSubflow: SubflowTransport {
    let loop: any EventLoop
    let local: SocketAddress
    private(set) var remote: SocketAddress
    private(set) var connection: DatagramConnection
    private var channel: (any Channel)?
    /// Opener: its own socket, connected to the listener. Listener: the socket bound to the
    /// address the opener sent to, shared by every subflow to that address and not connected
    /// (a connected UDP socket dies of the ICMP error that follows a NAT rebinding), so each
    /// datagram names its destination.
    private var ownsChannel = true
    private var inbound: DatagramInbound?
    /// Listener side: the shared socket's handler, for its backlog.
    private var sharedInbound: DatagramInbound?
    var id = SubflowID(0)
    var delegate: (any SubflowDelegate)?
    var handshakeSentAt: NIODeadline?
    /// The listener's table of subflows forgets this one.
    var onClosed: ((DatagramSubflow) -> Void)?
    private let keepaliveInterval: TimeAmount
    /// Loss recovery, acknowledgement delay and pacing: the earliest of the connection's deadlines.
    private lazy var timer = LoopTimer(on: loop, owner: self) { $0.timerFired() }
    private lazy var keepaliveTimer = LoopTimer(on: loop, owner: self) { $0.keepaliveCheck() }
    private var lastSendAt: UInt64 = 0
    private var reportedWritable = true
    private var readPending = false
    private var closed = false
    private var reportedClosed = false
    private var outputShutdown = false
    private var peerShutdown = false
    /// Our SHUTDOWN is out: its acknowledgement, or the linger, ends the subflow.
    private var closingAfterShutdown = false
    private var closeError: (any Error)?
    private var closeOnAttach = false
    /// Listener side: a path check of a new peer address in progress.
    private var pathCheck: (address: SocketAddress, challenge: UInt64, attempts: Int)?
    /// Opener, until its session's engine takes the subflow on (`joinedSession`): why NIO is
    /// closing the socket (a send failed), and how often a socket was opened again after such a
    /// failure (`reopenSocket`).
    private var inHandshake = true
    private var sendFailure: (any Error)?
    private(set) var socketReopens = 0
    /// This subflow's socket is its own and may be opened again (`canReopenSocket`).
    private var openerInHandshake: Bool { connection.isOpener && ownsChannel && inHandshake }
    private let logger = Logger(label: "nbs.udp")

    init(loop: any EventLoop, local: SocketAddress, remote: SocketAddress, connectionID: UInt64, isOpener: Bool, options: NBSOptions) {
        self.loop = loop
        self.local = local.unmapped
        self.remote = remote.unmapped
        self.connection = DatagramConnection(connectionID: connectionID, isOpener: isOpener)
        self.keepaliveInterval = options.keepaliveInterval
    }

    static var now: UInt64 { NIODeadline.now().uptimeNanoseconds }

    // MARK: SubflowTransport

    var isWritable: Bool { !closed && connection.isWritable }
    var localAddress: SocketAddress? { local }
    var remoteAddress: SocketAddress? { remote }
    var maxDataPayload: Int? { connection.maxDataPayload }
    var datagramSize: Int? { connection.maxDatagramSize }
    var deliversInOrder: Bool { false }
    private(set) var peerAddressConfirmed = false

    func write(_ frame: Frame, flush: Bool) {
        guard !closed else { return }
        connection.queue(frame)
        if flush { transmit() }
    }

    func writeData(sequence: UInt64, payload: ByteBuffer) {
        guard !closed else { return }
        connection.queueData(sequence: sequence, payload: payload)
    }

    func flush() { transmit() }

    func writeAndClose(_ frame: Frame?) {
        guard !closed else { return }
        if let frame {
            connection.queue(frame)
            // A listener's subflow gets its socket a moment after its first datagram: a refusal
            // made before then goes out when it arrives.
            guard channel != nil else {
                closeOnAttach = true
                return
            }
            transmit()
            close(error: nil)
        } else if outputShutdown, peerShutdown || !connection.shutdownAcknowledged {
            // Our SHUTDOWN (and the CLOSE before it) should be acknowledged before the socket goes,
            // as TCP's kernel keeps resending a FIN after close; until then we resend, a while.
            // Once both ends said they are done the peer is closing too: half a second. While only
            // we are, a reset now would leave the peer waiting for our CLOSE until its close timeout,
            // its session failed though all was done (a burst of closes overflowed its socket: 236
            // of 3,000 UDP sessions at once, in bench-scale.sh): longer, then the reset.
            transmit()
            if connection.shutdownAcknowledged { return close(error: nil) }
            closingAfterShutdown = true
            if peerShutdown {
                loop.assumeIsolated().scheduleTask(in: .milliseconds(500)) { [self] in close(error: nil) }
            } else {
                loop.assumeIsolated().scheduleTask(in: connection.isOpener ? Self.unacknowledgedShutdownLinger : Self.listenerShutdownLinger) { [self] in
                    resetAndClose()
                }
            }
        } else {
            resetAndClose()
        }
    }

    /// How long a closing opener's subflow whose peer has not shut down keeps resending an
    /// unacknowledged SHUTDOWN. A listener that 10,000 sessions close on at once needs about 11 s of
    /// its loop to work through them; 5 s left a few hundred of them waiting for a CLOSE that had
    /// stopped coming, to fail at their close timeout (bench-scale.sh). The price: a session closed
    /// while a path dies silently takes the session's 2 s linger plus this before `close` returns.
    static let unacknowledgedShutdownLinger = TimeAmount.seconds(15)
    /// The same for a listener's subflow. Its peer is one opener, not thousands, and its orphans
    /// (subflows the opener dropped during a flap, as CI's flapping scenario leaves) would hold its
    /// `close` for 2 + 15 s. Variants that shortened an opener's resend too, on subflows that had
    /// been silent or suspended before the close, lost some of the storm's sessions again.
    static let listenerShutdownLinger = TimeAmount.seconds(5)

    func resetAndClose() {
        guard !closed else { return }
        if connection.hasKeys, let datagram = connection.pathDatagram(.reset, now: Self.now) { send(datagram) }
        close(error: nil)
    }

    func shutdownOutput() {
        guard !closed, !outputShutdown else { return }
        outputShutdown = true
        connection.queueShutdown()
        transmit()
    }

    func installKeys(_ keys: SessionKeys, localRole: SessionKeys.Role) {
        let peerRole: SessionKeys.Role = localRole == .client ? .server : .client
        handle(connection.installKeys(send: keys.packetKey(sentBy: localRole), receive: keys.packetKey(sentBy: peerRole), now: Self.now))
        startKeepalive()
    }

    func joinedSession() { inHandshake = false }

    func progress() -> EventLoopFuture<SubflowProgress>? { loop.makeSucceededFuture(currentProgress!) }

    var currentProgress: SubflowProgress? {
        let now = Self.now
        let silentSince = connection.silentSince ?? handshakeSentAt?.uptimeNanoseconds ?? now
        let srtt = Double(connection.rtt.smoothed) / 1e9
        return SubflowProgress(
            inFlight: connection.hasAckElicitingInFlight, silentMs: Int64((now - min(silentSince, now)) / 1_000_000),
            rttMs: connection.rtt.hasSample ? srtt * 1000 : 0,
            timeoutRetransmissions: max(connection.probeTimeouts, connection.acknowledgementOverdue(now: now) ? 1 : 0),
            bytesPerSecond: Double(connection.congestion.window) / max(srtt, 1e-4))
    }

    var readBacklog: LoopLag? { sharedInbound?.backlogLag }

    /// The congestion window is the queue: nothing to size.
    func setQueueLimit(_ bytes: Int) {}

    // MARK: sockets

    /// Opener: a socket bound to `local`, connected to `remote`. `prepare` runs on the loop before
    /// the first datagram can arrive.
    static func connect(on loop: any EventLoop, from local: SocketAddress, to remote: SocketAddress, options: NBSOptions,
                        prepare: @escaping @Sendable (DatagramSubflow) -> Void) -> EventLoopFuture<DatagramSubflow> {
        openSocket(on: loop, bind: local.withPort(0), connect: remote, reuseAddress: false).flatMapThrowing { channel in
            let subflow = DatagramSubflow(loop: loop, local: channel.localAddress ?? local, remote: remote,
                                          connectionID: UInt64.random(in: 1 ... .max), isOpener: true, options: options)
            subflow.failSendsForTesting = options.udpSendFailuresForTesting
            try subflow.attach(channel)
            prepare(subflow)
            return NIOLoopBound(subflow, eventLoop: loop)
        }.map { $0.value }
    }

    /// A UDP socket with a `DatagramInbound` handler, bound and, if asked, connected. A listener's
    /// (`sharedByListener`) is unconnected, reports each datagram's destination address, and
    /// counts its backlog as its loop's lag.
    static func openSocket(on loop: any EventLoop, bind local: SocketAddress, connect remote: SocketAddress?, reuseAddress: Bool,
                           sharedByListener: Bool = false) -> EventLoopFuture<any Channel> {
        // Don't Fragment, and the kernel's idea of the path MTU ignored (IP_PMTUDISC_PROBE): a probe
        // too large for the path must be lost, not fragmented, and `PathMTUSearch` is the authority.
        let ipv6 = local.protocol == .inet6
        var bootstrap = DatagramBootstrap(group: loop)
            .channelOption(.socketOption(.so_reuseaddr), value: reuseAddress ? 1 : 0)
            .channelOption(ipOption(ipv6: ipv6, v4: IP_MTU_DISCOVER, v6: IPV6_MTU_DISCOVER), value: Int(ipv6 ? IPV6_PMTUDISC_PROBE : IP_PMTUDISC_PROBE))
            // A listener's socket reads for every subflow to its address, whatever sizes they
            // reach; an opener's is sized to its path once connected (`searchPathMTU`).
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: sharedByListener ? DatagramWire.largestDatagramSize : Self.smallReadBuffer))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(DatagramInbound(sharedByListener: sharedByListener))
                }
            }
        if sharedByListener { bootstrap = bootstrap.channelOption(.receivePacketInfo, value: true) }
        // Room for the bursts a window of datagrams makes: the kernel's default is 208 KiB.
        bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: 4 << 20).channelOption(.socketOption(.so_sndbuf), value: 4 << 20)
        // A listener's socket carries every subflow to its address. Read 4 datagrams per wake-up
        // (NIO's default) and 3,000 idle sessions' probe rounds overflowed even 4 MiB of buffer
        // (70,000 drops in one run, each a probe timeout): read up to 256. (Not NIO's vector reads:
        // with them the hellos' IP_PKTINFO did not arrive, and no opener got an ACCEPT.)
        bootstrap = bootstrap.channelOption(.maxMessagesPerRead, value: UInt(readsPerWakeup))
        let bound = bootstrap.bind(to: local)
        guard let remote else { return bound }
        return bound.flatMap { channel in
            channel.connect(to: remote).map { channel }.flatMapError { error in
                channel.close(promise: nil)
                return channel.eventLoop.makeFailedFuture(error)
            }
        }
    }

    /// Datagrams NIO reads from a socket per wake-up (`maxMessagesPerRead`).
    static let readsPerWakeup = 256

    /// The IP-level option `v4` (IPPROTO_IP) or `v6` (IPPROTO_IPV6), as the socket's family needs.
    static func ipOption(ipv6: Bool, v4: Int32, v6: Int32) -> ChannelOptions.Types.SocketOption {
        ipv6 ? .init(level: .ipv6, name: .init(rawValue: v6)) : .ipOption(.init(rawValue: v4))
    }
    /// NIO's own size for a datagram read: room for the base size and any Ethernet path's.
    static let smallReadBuffer = 2048

    /// An opener's socket is connected, so the kernel knows the route's MTU (`IP_MTU`): the sizes
    /// to probe for follow from it, and so does what the socket must be able to read.
    private func searchPathMTU(on channel: any Channel) {
        guard let options = channel.syncOptions else { return }
        let ipv6 = remote.protocol == .inet6
        guard let linkMTU = try? options.getOption(Self.ipOption(ipv6: ipv6, v4: IP_MTU, v6: IPV6_MTU)) else { return }
        let sizes = PathMTUSearch.candidates(linkMTU: Int(linkMTU), ipv6: ipv6).map { min($0, DatagramWire.largestDatagramSize) }
        if let largest = sizes.max(), largest > Self.smallReadBuffer {
            try? options.setOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: largest))
        }
        connection.probeDatagramSizes(sizes)
    }

    /// Makes `channel` this subflow's socket (the first one, or the one a path check found).
    func attach(_ channel: any Channel) throws {
        loop.preconditionInEventLoop()
        let inbound = try channel.pipeline.syncOperations.handler(type: DatagramInbound.self)
        let bound = NIOLoopBound(self, eventLoop: loop)
        inbound.onDatagram = { envelope in bound.value.receive(envelope.data, from: envelope.remoteAddress) }
        inbound.onReadComplete = { bound.value.readComplete() }
        inbound.onError = { bound.value.socketError($0) }
        inbound.onInactive = { [weak channel] in
            guard let channel else { return }
            bound.value.socketClosed(channel)
        }
        self.channel = channel
        self.inbound = inbound
        if connection.isOpener { searchPathMTU(on: channel) }
        transmit()
        if closeOnAttach { close(error: nil) }
    }

    /// The listener could not give this subflow a socket.
    func socketFailed(_ error: any Error) {
        close(error: error)
    }

    private func socketError(_ error: any Error) {
        // Nothing listens there (an ICMP port unreachable): final before the handshake, a
        // transient condition of the path after it, which loss recovery deals with.
        guard !connection.hasKeys else { return }
        close(error: error)
    }

    private func socketClosed(_ channel: any Channel) {
        guard channel === self.channel else { return }
        if let failure = sendFailure, canReopenSocket(after: failure) { return reopenSocket() }
        close(error: closeError ?? sendFailure)
    }

    /// SwiftNIO closes a UDP socket whose send fails with anything but EMSGSIZE or EHOSTUNREACH.
    /// During the handshake that made an open fail at once where TCP sends its SYN again and rides
    /// the fault out: a local firewall's drop rule (EPERM) or a moment without a route
    /// (ENETUNREACH). In the soak over UDP subflows (seed 738263621) 22 of 200 opens failed so during
    /// a blackhole and a flap. So an opener's socket is opened again on the same address and port
    /// (to the listener it is the same sender), and loss recovery sends what was lost again, within
    /// the attempt's budget. That lasts until the session's engine has the subflow: an opener's keys
    /// come with ACCEPT, but over UDP its DATA_ACK must still reach the listener for the verdict.
    /// Once the session has it, such a failure still ends the subflow: the session has its others,
    /// and the failure is the quickest sign that this path is gone.
    private func canReopenSocket(after failure: any Error) -> Bool {
        guard openerInHandshake, !closed, socketReopens < Self.maxSocketReopens,
              let error = failure as? IOError else { return false }
        return [EPERM, EACCES, ENETUNREACH, ENETDOWN, ENOBUFS].contains(error.errnoCode)
    }

    /// More than the hellos a handshake budget of several seconds sends with loss recovery's backoff.
    static let maxSocketReopens = 8

    private func reopenSocket() {
        socketReopens += 1
        logger.debug("subflow \(id) \(local) → \(remote): a send failed (\(sendFailure.map { "\($0)" } ?? "?")); opening the socket again")
        sendFailure = nil
        inbound?.detach()
        inbound = nil
        channel = nil
        Self.openSocket(on: loop, bind: local, connect: remote, reuseAddress: false).assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success(let channel):
                guard !closed else { return channel.close(promise: nil) }
                do { try attach(channel) } catch { close(error: error) }
            case .failure(let error):
                // The address went (EADDRNOTAVAIL) or has no route: that is the open's answer.
                close(error: error)
            }
        }
    }

    // MARK: sending

    /// Listener side: the shared socket of `local`, which the listener reads for this subflow.
    func attachShared(_ channel: any Channel) {
        loop.preconditionInEventLoop()
        self.channel = channel
        ownsChannel = false
        sharedInbound = try? channel.pipeline.syncOperations.handler(type: DatagramInbound.self)
        transmit()
        if closeOnAttach { close(error: nil) }
    }

    /// The listener's shared socket went away (its address did): so did this subflow's path.
    func sharedSocketClosed() {
        close(error: NBSError.connectionLost("the local address's socket closed"))
    }

    private func write(datagram: ByteBuffer, to destination: SocketAddress? = nil, on channel: any Channel) {
        if dropEveryForTesting > 0 {
            sentForTesting += 1
            // Sent, as far as this end can tell, and lost on the way.
            if sentForTesting % dropEveryForTesting == 0 { return }
        }
        if failSendsForTesting.count > 0, channel === self.channel {
            if failSendsForTesting.after > 0 {
                failSendsForTesting.after -= 1
            } else {
                failSendsForTesting.count -= 1
                // As SwiftNIO does when sendmsg fails: the write's promise fails, then the socket closes.
                sendFailure = IOError(errnoCode: EPERM, reason: "sendmsg (test hook)")
                return channel.close(promise: nil)
            }
        }
        if openerInHandshake {
            // A handshake's datagrams are few: the reason NIO closes the socket on is worth a promise.
            let written = channel.eventLoop.makePromise(of: Void.self)
            written.futureResult.assumeIsolated().whenFailure { [self] error in
                // Writes after the socket closed fail too, with nothing to say about why it did.
                if channel === self.channel { sendFailure = error }
            }
            channel.write(datagram, promise: written)
        } else if ownsChannel {
            channel.write(datagram, promise: nil)
        } else {
            channel.write(AddressedEnvelope(remoteAddress: destination ?? remote, data: datagram), promise: nil)
        }
    }

    private func send(_ datagram: ByteBuffer, to destination: SocketAddress? = nil) {
        guard let channel else { return }
        write(datagram: datagram, to: destination, on: channel)
        channel.flush()
        delegate?.subflowSent(self)
    }

    /// Sends what the window and the pacer allow, and sets the timer for the rest.
    private func transmit() {
        guard !closed, let channel else { return }
        let now = Self.now
        var wrote = false
        let watchedBefore = connection.lastAckElicitingSentAt
        var pacingWait: UInt64?
        sending: while true {
            switch connection.nextDatagram(now: now, allocator: channel.allocator) {
            case .datagram(let datagram):
                write(datagram: datagram, on: channel)
                wrote = true
            case .wait(let until):
                pacingWait = until
                break sending
            case .nothing:
                break sending
            }
        }
        if wrote {
            channel.flush()
            lastSendAt = now
            // Only what the peer acknowledges is worth watching: a datagram of ACKs alone is not.
            if connection.lastAckElicitingSentAt != watchedBefore { delegate?.subflowSent(self) }
        }
        armTimer(pacing: pacingWait)
        updateWritability()
    }

    /// The timer follows the connection's earliest deadline (or the pacer's). It never cancels a NIO
    /// task (`LoopTimer`): this ran per acknowledgement and per send, and with 8,000 subflows on one
    /// event loop NIO's linear search for a cancelled task made opening and acknowledging slow enough
    /// to time probes out.
    private func armTimer(pacing: UInt64?) {
        guard let deadline = [pacing, connection.nextTimeout].compactMap({ $0 }).min() else { return timer.stop() }
        timer.arm(at: NIODeadline.uptimeNanoseconds(deadline))
    }

    private func timerFired() {
        guard !closed else { return }
        handle(connection.timeout(now: Self.now))
        transmit()
    }

    private func updateWritability() {
        let writable = isWritable
        guard writable != reportedWritable else { return }
        reportedWritable = writable
        delegate?.subflowWritabilityChanged(self, writable: writable)
    }

    /// Checked twice per interval, so the silence before a keepalive is between 1 and 1.5 intervals.
    private func startKeepalive() {
        guard !keepaliveTimer.isArmed, keepaliveInterval > .zero else { return }
        keepaliveTimer.arm(in: .nanoseconds(keepaliveInterval.nanoseconds / 2), slack: keepaliveSlack)
    }

    /// Keepalive checks of a loop's subflows come together (`LoopTimer.idleGrain`), or to a quarter
    /// of a shorter interval.
    private var keepaliveSlack: TimeAmount { .nanoseconds(min(LoopTimer.idleGrain.nanoseconds, keepaliveInterval.nanoseconds / 4)) }

    private func keepaliveCheck() {
        guard !closed else { return }
        if Self.now - lastSendAt >= UInt64(keepaliveInterval.nanoseconds) {
            connection.queuePing()
            transmit()
        }
        keepaliveTimer.arm(in: .nanoseconds(keepaliveInterval.nanoseconds / 2), slack: keepaliveSlack)
    }

    // MARK: receiving

    func receive(_ datagram: ByteBuffer, from source: SocketAddress) {
        guard !closed else { return }
        // NIO's own small buffers are left as they were before path MTU discovery made them larger.
        let datagram = datagram.capacity > Self.smallReadBuffer ? datagram.copiedOutIfSmall(allocator: channel?.allocator ?? ByteBufferAllocator()) : datagram
        let result = connection.receive(datagram, now: Self.now)
        if result.authenticated { peerAddressConfirmed = true }
        if result.dropped != nil {
            readPending = true  // a gap in the control stream is answered with an ACK at once
            return
        }
        if !Self.sameEndpoint(source, remote), result.authenticated, result.isNewest { checkPath(to: source.unmapped) }
        handle(result.events, from: source)
        readPending = true
    }

    func readComplete() {
        guard readPending, !closed else { return }
        readPending = false
        delegate?.subflowReadComplete(self)
        transmit()
    }

    private func handle(_ events: [DatagramConnection.Event], from source: SocketAddress? = nil) {
        for event in events {
            guard !closed else { return }
            switch event {
            case .frame(let frame):
                delegate?.subflow(self, received: frame)
            case .dataLost(let sequence, let length):
                delegate?.subflow(self, lostDataAt: sequence, length: length)
            case .peerShutdown:
                peerShutdown = true
                delegate?.subflowInputClosed(self)
            case .peerReset:
                close(error: NBSError.connectionLost("the peer reset the subflow"))
            case .pathChallenge(let value):
                if let datagram = connection.pathDatagram(.pathResponse(value), now: Self.now) { send(datagram) }
            case .pathResponse(let value):
                pathConfirmed(value)
            case .malformed(let why):
                closeError = NBSError.protocolViolation(why)
                writeAndClose(.abort(.init(reason: .protocolViolation, message: why)))
            case .datagramSizeConfirmed(let size):
                // The engine sizes its segments to it at the next progress report (`maxDataPayload`).
                logger.debug("subflow \(id) \(local) → \(remote): datagrams of \(size) bytes get through")
            }
        }
        if connection.shutdownAcknowledged, closingAfterShutdown { close(error: nil) }
    }

    static func sameEndpoint(_ a: SocketAddress, _ b: SocketAddress) -> Bool {
        a.unmapped.hostString == b.unmapped.hostString && a.port == b.port
    }

    // MARK: NAT rebinding (listener side)

    /// An authenticated, newest datagram from a new source address: the peer's NAT (or the peer)
    /// moved. The subflow follows only once the new address answers a challenge, so a replayed
    /// or redirected datagram cannot move it (QUIC's path validation). Only a listener follows:
    /// an opener's socket is connected and hears only the listener's address.
    private func checkPath(to address: SocketAddress) {
        guard !ownsChannel else { return }
        if let check = pathCheck, Self.sameEndpoint(check.address, address) { return }
        let challenge = UInt64.random(in: 1 ... .max)
        pathCheck = (address, challenge, 0)
        logger.info("subflow \(id): datagram from \(address) instead of \(remote); checking the new path")
        sendChallenge(challenge)
    }

    private func sendChallenge(_ challenge: UInt64) {
        guard !closed, let check = pathCheck, check.challenge == challenge else { return }
        guard check.attempts < 3 else {
            logger.info("subflow \(id): \(check.address) did not answer its path check")
            pathCheck = nil
            return
        }
        pathCheck?.attempts += 1
        if let datagram = connection.pathDatagram(.pathChallenge(challenge), now: Self.now) { send(datagram, to: check.address) }
        let wait = TimeAmount.nanoseconds(Int64(max(3 * connection.rtt.smoothed, 50_000_000)))
        loop.assumeIsolated().scheduleTask(in: wait) { [self] in sendChallenge(challenge) }
    }

    private func pathConfirmed(_ value: UInt64) {
        guard let check = pathCheck, check.challenge == value else { return }
        pathCheck = nil
        let old = remote
        remote = check.address
        delegate?.subflow(self, peerMovedFrom: old, to: check.address)
    }

    // MARK: closing

    private func close(error: (any Error)?, line: Int = #line) {
        guard !closed else { return }
        logger.debug("subflow \(id) \(local) ↔ \(remote) closing (from line \(line)): \(error.map { "\($0)" } ?? "no error")")
        // Stopping a LoopTimer cancels nothing: its pending task fires and finds no deadline.
        closed = true
        timer.stop()
        keepaliveTimer.stop()
        pathCheck = nil
        inbound?.detach()
        sharedInbound = nil
        if let channel, ownsChannel { closeOnNextTick(channel) }
        onClosed?(self)
        onClosed = nil
        guard !reportedClosed else { return }
        reportedClosed = true
        delegate?.subflowClosed(self, error: error ?? closeError)
    }

    /// Test hook: the opener's NAT gives it a new source port. The subflow moves to a fresh
    /// socket on the same local address without telling the peer, as a rebinding does.
    func rebindForTesting() -> EventLoopFuture<Void> {
        let remote = self.remote
        return Self.openSocket(on: loop, bind: local.withPort(0), connect: remote, reuseAddress: false).assumeIsolated().flatMapThrowing { [self] channel in
            let old = self.channel
            inbound?.detach()
            try attach(channel)
            old?.close(promise: nil)
            connection.queuePing()
            transmit()
        }.nonisolated()
    }

    var statistics: DatagramConnection.Statistics { connection.statistics }

    /// Test hook: every Nth datagram this subflow sends is lost on the way (0: none).
    var dropEveryForTesting = 0
    /// Test hook: after `after` sends, the next `count` fail locally (EPERM, as under a firewall's
    /// drop rule).
    var failSendsForTesting = (after: 0, count: 0)
    private var sentForTesting = 0
}

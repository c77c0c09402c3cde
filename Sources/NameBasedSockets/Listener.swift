import Crypto
import Logging
import NBSProtocol
import NIOCore
import NIOPosix

/// Accepts sessions addressed to one name. OPENs for other names are refused with a reason, JOINs
/// are matched to their session by token and authenticated; neither failure touches anything else.
public final class Listener: Sendable {
    public let localName: String
    public let port: Int
    /// Where the listener is bound (the actual port when 0 was asked for).
    public let boundAddresses: [SocketAddress]
    private let loop: any EventLoop
    private let state: NIOLoopBound<ListenerState>
    private let channels: [any Channel]
    let datagrams: NIOLoopBound<DatagramListener>?
    public var transport: NBSOptions.Transport { datagrams == nil ? .tcp : .udp }

    private init(localName: String, port: Int, boundAddresses: [SocketAddress], loop: any EventLoop, state: NIOLoopBound<ListenerState>,
                 channels: [any Channel], datagrams: NIOLoopBound<DatagramListener>?) {
        self.datagrams = datagrams
        self.localName = localName
        self.port = port
        self.boundAddresses = boundAddresses
        self.loop = loop
        self.state = state
        self.channels = channels
    }

    /// The kernel's accept queue (capped by net.core.somaxconn). Every session's JOINs arrive in a
    /// burst after its OPEN: at 256, the soak's 200 concurrent opens overflowed it about 1,100 times,
    /// and a connection whose handshake the kernel dropped reached the listener a retransmission
    /// (a second or more) later, past `legacyDetectionDelay`, to be taken for a legacy client.
    static let listenBacklog: Int32 = 4096

    static func start(localName: String, port: Int, options: NBSOptions) async throws -> Listener {
        let loop = options.eventLoopGroup.next()
        let state = try await loop.submit { NIOLoopBound(ListenerState(loop: loop, localName: localName, options: options), eventLoop: loop) }.get()
        let datagrams: NIOLoopBound<DatagramListener>? = options.transport == .udp
            ? try await loop.submit { NIOLoopBound(DatagramListener(loop: loop, state: state.value, options: options), eventLoop: loop) }.get()
            : nil
        var candidates = try options.bindAddresses ?? [SocketAddress(ipAddress: "::", port: port)]
        var channels: [any Channel] = []
        var lastError: (any Error)?
        var fellBack = options.bindAddresses != nil
        while !candidates.isEmpty {
            let address = candidates.removeFirst()
            do {
                if options.transport == .udp {
                    channels.append(try await DatagramListener.bind(address, listener: datagrams!, on: loop).get())
                    fellBack = true
                    continue
                }
                let channel = try await ServerBootstrap(group: loop)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: Self.listenBacklog)
                    .childChannelInitializer { channel in
                        guard options.acceptLegacyClients else {
                            return SubflowConnector.configure(channel).flatMapThrowing {
                                let handler = try channel.pipeline.syncOperations.handler(type: SubflowHandler.self)
                                state.value.newConnection(handler)
                            }
                        }
                        return SubflowConnector.setSocketOptions(channel).flatMapThrowing {
                            let classifier = FirstBytesClassifier(side: .listener, silence: options.legacyDetectionDelay) { outcome, context in
                                state.value.classified(outcome, channel: context.channel)
                            }
                            try channel.pipeline.syncOperations.addHandler(classifier)
                        }
                    }
                    .bind(to: address).get()
                // Refused by a kernel without Fast Open: the listener takes plain connections only.
                if options.tcpFastOpen {
                    try? await channel.setOption(.tcpOption(SubflowConnector.tcpFastOpen), value: SocketOptionValue(Self.listenBacklog)).get()
                }
                if let rto = options.tcpMinimumRTO {
                    try? await channel.setOption(.tcpOption(SubflowConnector.tcpMinimumRTO), value: SubflowConnector.minimumRTOValue(rto)).get()
                }
                channels.append(channel)
            } catch {
                lastError = error
                // No IPv6 on this host: the IPv4 wildcard instead.
                if !fellBack { candidates.append(try SocketAddress(ipAddress: "0.0.0.0", port: port)) }
            }
            fellBack = true
        }
        guard !channels.isEmpty else { throw NBSError.bindFailed("port \(port): \(lastError.map { "\($0)" } ?? "no address")") }
        let bound = channels.compactMap(\.localAddress)
        return Listener(localName: localName, port: bound.first?.port ?? port, boundAddresses: bound, loop: loop, state: state, channels: channels,
                        datagrams: datagrams)
    }

    /// The next session addressed to this listener's name. Cancelling the calling task ends the
    /// wait with `CancellationError`, and the next session goes to the next call.
    public func accept() async throws -> Session {
        let state = self.state
        return try await LoopWait.run(on: loop) { state.value.accept($0) } cancel: { state.value.cancelAccept($0) }
    }

    /// Test hook: each TCP socket's Fast Open queue length (0: Fast Open off).
    func fastOpenQueueLengths() async throws -> [SocketOptionValue] {
        var lengths: [SocketOptionValue] = []
        for channel in channels { lengths.append(try await channel.getOption(.tcpOption(SubflowConnector.tcpFastOpen)).get()) }
        return lengths
    }

    /// Test hook: connections awaiting OPEN/JOIN, sessions being verified, sessions running,
    /// sessions waiting for accept().
    func stateCounts() async -> (pending: Int, verifying: Int, sessions: Int, ready: Int) {
        let state = self.state
        return (try? await loop.submit { state.value.stateCounts }.get()) ?? (0, 0, 0, 0)
    }

    /// Test hook: UDP subflows the listener demultiplexes, and datagrams it dropped unread.
    func datagramCounts() async -> (subflows: Int, dropped: Int) {
        guard let datagrams else { return (0, 0) }
        return (try? await loop.submit { (datagrams.value.subflowCount, datagrams.value.dropped) }.get()) ?? (0, 0)
    }

    /// Stops accepting; sessions already accepted go on.
    public func close() async {
        for channel in channels { try? await channel.close() }
        if let datagrams { try? await loop.submit { datagrams.value.close() }.get() }
        let state = self.state
        try? await loop.submit { state.value.close() }.get()
    }
}

final class ListenerState: SubflowDelegate {
    let loop: any EventLoop
    let localName: String
    let options: NBSOptions
    private var sessions: [UInt64: SessionEngine] = [:]
    /// Connections that have not completed OPEN or JOIN yet.
    private var pending: [ObjectIdentifier: (handler: any SubflowTransport, machine: SubflowStateMachine, serial: UInt64)] = [:]
    /// Sessions whose ACCEPT is sent and whose opener is being verified: not in `sessions` (no
    /// JOIN reaches them) nor visible to accept(). Bounded by maxPendingHandshakes.
    private var verifying: [ObjectIdentifier: PendingVerification] = [:]
    /// Forward lookups of openers' names in progress. Bounded by maxPendingVerifications: only
    /// these wait on something other than the opener, so only these can pile up.
    private var lookupsInProgress = 0
    /// Handshake timeouts of `pending` and `verifying`, served by one timer and never cancelled (NIO's
    /// cancellation is a linear search of its heap, which 20,000 subflows fill): an entry that ended
    /// is left in the queue, and its serial no longer matches when its deadline comes.
    private var handshakeDeadlines = DeadlineQueue<ObjectIdentifier>()
    private var nextSerial: UInt64 = 0
    private lazy var handshakeTimer = LoopTimer(on: loop, owner: self) { $0.handshakesExpired() }
    private var ready = CircularBuffer<Session>()
    private var waiters = CircularBuffer<LoopWait<Session>>()
    private var closed = false
    /// The next OPEN's ephemeral key, made after the previous OPEN was answered: generating it
    /// while an opener waits put a quarter of the listener's handshake work on that opener's path.
    private var nextEphemeralKey = Curve25519.KeyAgreement.PrivateKey()
    private let logger = Logger(label: "nbs.listener")
    private(set) var refusals = 0

    /// Keeps this loop's interface feed running while the listener is open, so that each session
    /// it admits finds the subscription made rather than making one.
    private var interfaceFeed: LoopInterfaceFeed.Membership?

    /// Call on `loop`.
    init(loop: any EventLoop, localName: String, options: NBSOptions) {
        self.loop = loop
        self.localName = localName
        self.options = options
        if let monitor = options.interfaceMonitor {
            interfaceFeed = LoopInterfaceFeed.join(monitor, on: loop, knowing: .current(monitor: monitor)) { _ in }
        }
    }

    func newConnection(_ handler: any SubflowTransport) {
        handler.delegate = self
        let key = ObjectIdentifier(handler)
        guard pending.count < options.maxPendingHandshakes else {
            // Not in `pending`, so whatever it sends is ignored; refused once the channel is active.
            refusals += 1
            let boundHandler = NIOLoopBound(handler, eventLoop: loop)
            loop.execute {
                boundHandler.value.writeAndClose(.abort(.init(reason: .resourceLimit, message: "too many connections in handshake")))
            }
            return
        }
        pending[key] = (handler, .listenerSide(), startHandshakeTimeout(key))
    }

    /// A serial for the entry that `key` now names, whose handshake must end within `handshakeTimeout`.
    private func startHandshakeTimeout(_ key: ObjectIdentifier) -> UInt64 {
        nextSerial += 1
        let deadline = NIODeadline.now() + options.handshakeTimeout
        handshakeDeadlines.add(key, serial: nextSerial, deadline: deadline)
        handshakeTimer.armIfEarlier(at: deadline)
        return nextSerial
    }

    private func handshakesExpired() {
        for (key, serial) in handshakeDeadlines.popExpired(now: .now()) {
            if pending[key]?.serial == serial, let entry = pending.removeValue(forKey: key) {
                entry.handler.writeAndClose(.abort(.init(reason: .timeout, message: "no OPEN or JOIN in time")))
            } else if verifying[key]?.serial == serial {
                refuseVerifying(key, .timeout, "the opener did not finish its handshake in time")
            }
        }
        if let next = handshakeDeadlines.next { handshakeTimer.arm(at: next) }
    }

    /// Room for one more connection in handshake: UDP listeners ask before they make a socket.
    var canTakeHandshake: Bool { pending.count < options.maxPendingHandshakes && !closed }

    func accept(_ wait: LoopWait<Session>) {
        guard !wait.cancelled else { return }
        if let session = ready.popFirst() { return wait.answer(.success(session)) }
        if closed { return wait.answer(.failure(NBSError.listenerClosed)) }
        waiters.append(wait)
    }

    func cancelAccept(_ wait: LoopWait<Session>) {
        if wait.cancel() { waiters.removeAll { $0 === wait } }
    }

    func close() {
        closed = true
        interfaceFeed?.cancel()
        interfaceFeed = nil
        for waiter in waiters { waiter.answer(.failure(NBSError.listenerClosed)) }
        waiters.removeAll()
    }

    private func refuse(_ handler: any SubflowTransport, _ reason: CloseReason, _ message: String) {
        refusals += 1
        logger.info("refused a subflow from \(handler.peerDescription): \(reason) \(message)")
        handler.writeAndClose(.abort(.init(reason: reason, message: message)))
    }

    func subflow(_ handler: any SubflowTransport, received frame: Frame) {
        let key = ObjectIdentifier(handler)
        if verifying[key] != nil { return verifyingReceived(key, frame) }
        guard var entry = pending.removeValue(forKey: key) else { return }
        switch entry.machine.receive(frame) {
        case .handshake(.open(let open)):
            handleOpen(open, handler: handler, machine: entry.machine)
        case .handshake(.join(let join)):
            handleJoin(join, handler: handler, machine: entry.machine)
        case .protocolViolation(let why):
            refuse(handler, .protocolViolation, why)
        default:
            refuse(handler, .protocolViolation, "expected OPEN or JOIN, got \(frame.type)")
        }
    }

    private func handleOpen(_ open: Frame.Open, handler: any SubflowTransport, machine: SubflowStateMachine) {
        guard !closed else { return refuse(handler, .shuttingDown, "listener closing") }
        guard canonicalName(open.destinationName) == canonicalName(localName) else {
            return refuse(handler, .nameNotServed, "this listener serves \(localName), not \(open.destinationName)")
        }
        guard ready.count < options.acceptBacklog else { return refuse(handler, .resourceLimit, "accept backlog full") }
        guard verifying.count < options.maxPendingHandshakes else { return refuse(handler, .resourceLimit, "too many sessions being set up") }
        guard let local = handler.localAddress, let remote = handler.remoteAddress else { return }
        var token = UInt64.random(in: 1 ... .max)
        while sessions[token] != nil || verifying.values.contains(where: { $0.accept.token == token }) { token = UInt64.random(in: 1 ... .max) }
        let accept: Frame.Accept
        let keys: SessionKeys
        // Replaced once this OPEN is answered (and, if admitted at OPEN, its verdict sent).
        defer { nextEphemeralKey = .init() }
        do {
            (accept, keys) = try ServerHandshake.accept(open, serverName: localName, token: token, receiveWindow: UInt32(clamping: options.receiveCapacity),
                                                        privateKey: nextEphemeralKey)
        } catch {
            return refuse(handler, .protocolViolation, "\(error)")
        }
        if let identity = options.identity {
            handler.write(.identity(identity.prove(HandshakeTranscript(open: open, accept: accept), as: .server)), flush: false)
        }
        handler.installKeys(keys, localRole: .server)
        handler.write(.accept(accept))
        var established = machine
        established.handshakeCompleted()
        let key = ObjectIdentifier(handler)
        verifying[key] = PendingVerification(handler: handler, machine: established, open: open, accept: accept, keys: keys,
                                             local: local, remote: remote.unmapped, serial: startHandshakeTimeout(key))
        // An opener that announced its window proves nothing after ACCEPT: what we know now is all
        // the verdict can rest on, so it comes right behind the ACCEPT (or behind the name's lookup).
        // Not on a UDP subflow, whose hello may come from a forged address: there the verdict and the
        // application's first bytes wait for the opener's authenticated DATA_ACK.
        if open.receiveWindow != nil, handler.peerAddressConfirmed { startVerification(key) }
    }

    /// Frames from an opener between our ACCEPT and our verdict: its optional IDENTITY, then its
    /// DATA_ACK, which ends its part of the handshake and starts verification.
    private func verifyingReceived(_ key: ObjectIdentifier, _ frame: Frame) {
        guard var entry = verifying[key] else { return }
        switch entry.machine.receive(frame) {
        case .session(.identity(let proof)):
            // Verification starts at the first frame after ACCEPT, or at OPEN after a window.
            guard entry.identity == nil, !entry.verificationStarted else {
                return refuseVerifying(key, .protocolViolation, "IDENTITY out of place")
            }
            entry.identity = proof
            verifying[key] = entry
        case .session(let other):
            // An opener that does not wait for our verdict may send on; a little is kept for the
            // session, more is refused rather than buffered.
            guard entry.frames.count < PendingVerification.maxQueuedFrames else {
                return refuseVerifying(key, .resourceLimit, "too much sent before the session was admitted")
            }
            entry.frames.append(other)
            verifying[key] = entry
            if !entry.verificationStarted { startVerification(key) }
        case .peerAborted(let close):
            verifying.removeValue(forKey: key)
            refusals += 1
            logger.info("the opener \(entry.open.sourceName) at \(entry.remote.hostString) refused the session: \(close.reason) \(close.message)")
            entry.handler.writeAndClose(nil)
        case .protocolViolation(let why):
            refuseVerifying(key, .protocolViolation, why)
        default:
            refuseVerifying(key, .protocolViolation, "unexpected \(frame.type) before the session was admitted")
        }
    }

    private func startVerification(_ key: ObjectIdentifier) {
        guard var entry = verifying[key], !entry.verificationStarted else { return }
        entry.verificationStarted = true
        verifying[key] = entry
        let transcript = HandshakeTranscript(open: entry.open, accept: entry.accept)
        var proven: [UInt8]?
        if let proof = entry.identity {
            guard let publicKey = transcript.verify(proof, by: .client) else {
                return refuseVerifying(key, .authenticationFailed, "the opener's identity proof does not verify for this session")
            }
            proven = publicKey
        }
        let name = entry.open.sourceName
        let pinned = options.pinnedKey(for: name)
        let evidence = PeerEvidence(claimedName: name, sourceAddress: entry.remote.hostString, provenKey: proven, pinnedKey: pinned)
        guard NameVerifier.needsResolution(name, pinned: pinned != nil) else { return finishVerification(key, evidence) }
        guard options.lookUpPeerNames || options.requiredPeerVerification == .dnsConfirmed else {
            var unchecked = evidence
            unchecked.resolutionFailure = "not looked up (lookUpPeerNames is off)"
            return finishVerification(key, unchecked)
        }
        guard lookupsInProgress < options.maxPendingVerifications else {
            return refuseVerifying(key, .resourceLimit, "too many name lookups in progress")
        }
        lookupsInProgress += 1
        let resolver = options.resolver
        let lookup = loop.makePromise(of: [SocketAddress].self)
        lookup.completeWithTask { try await resolver.resolve(name, port: 0) }
        let limit = options.nameVerificationTimeout
        // Not cancelled when the answer comes first (failing a completed promise does nothing).
        loop.scheduleTask(in: limit) {
            lookup.fail(NBSError.nameResolutionFailed(name: name, reason: "no answer within \(limit)"))
        }
        let bound = NIOLoopBound(self, eventLoop: loop)
        lookup.futureResult.whenComplete { outcome in
            bound.value.lookupsInProgress -= 1
            var evidence = evidence
            switch outcome {
            case .success(let addresses): evidence.resolvedAddresses = addresses.map(\.hostString)
            case .failure(let error): evidence.resolutionFailure = "\(error)"
            }
            bound.value.finishVerification(key, evidence)
        }
    }

    private func finishVerification(_ key: ObjectIdentifier, _ evidence: PeerEvidence) {
        // Gone: timed out, or the connection closed while the name was being resolved.
        guard let entry = verifying[key] else { return }
        let result = NameVerifier.evaluate(evidence)
        if let why = NameVerifier.refusal(result, required: options.requiredPeerVerification) {
            return refuseVerifying(key, .verificationFailed, why)
        }
        guard !closed else { return refuseVerifying(key, .shuttingDown, "listener closing") }
        guard ready.count < options.acceptBacklog else { return refuseVerifying(key, .resourceLimit, "accept backlog full") }
        verifying.removeValue(forKey: key)
        let token = entry.accept.token
        let engine = SessionEngine(loop: loop, role: .listener, localName: localName, peerName: entry.open.sourceName, port: entry.local.port ?? 0,
                                   options: options, keys: entry.keys, token: token, peerInitialWindow: entry.open.receiveWindow ?? 0,
                                   addressBook: LocalAddressBook.current(monitor: options.interfaceMonitor), peerAddresses: [entry.remote])
        engine.peerVerification = result.level
        sessions[token] = engine
        let bound = NIOLoopBound(self, eventLoop: loop)
        engine.onTerminate = { bound.value.sessions[token] = nil }
        engine.adoptEstablished(entry.handler, machine: entry.machine, local: entry.local, remote: entry.remote, backup: false)
        for frame in entry.frames { entry.handler.delegate?.subflow(entry.handler, received: frame) }
        engine.startPathManagement()
        deliver(Session(engine: engine))
    }

    private func deliver(_ session: Session) {
        if let waiter = waiters.popFirst() { waiter.answer(.success(session)) } else { ready.append(session) }
    }

    /// Ends a session before the application saw it. Keys exist, so the ABORT is authenticated.
    fileprivate func refuseVerifying(_ key: ObjectIdentifier, _ reason: CloseReason, _ message: String) {
        guard let entry = verifying.removeValue(forKey: key) else { return }
        refusals += 1
        logger.warning("refused \(entry.open.sourceName) at \(entry.remote.hostString): \(reason): \(message)")
        entry.handler.writeAndClose(SignalAuthenticator(keys: entry.keys, localRole: .server).close(reason, message, abort: true))
    }

    /// A new connection's first bytes (or its silence) told what it is: NBS connections go on to
    /// OPEN or JOIN, anything else becomes a legacy session named after its address.
    func classified(_ outcome: FirstBytesClassifier.Outcome, channel: any Channel) -> FirstBytesClassifier.Disposition {
        do {
            guard outcome.verdict == .legacy else {
                try SubflowConnector.addSubflowHandlers(channel)
                newConnection(try channel.pipeline.syncOperations.handler(type: SubflowHandler.self))
                return .forward
            }
            guard !closed, ready.count < options.acceptBacklog, let local = channel.localAddress, let remote = channel.remoteAddress?.unmapped else {
                refusals += 1
                channel.close(promise: nil)
                return .drop
            }
            let name = ReverseName.of(remote) ?? remote.description
            logger.info("legacy client \(remote) (\(outcome.evidence)) accepted as \(name)")
            deliver(try LegacyConnection.adopt(channel, role: .listener, localName: localName, peerName: name, port: local.port ?? 0, options: options,
                                               checkFirstBytesForNBS: outcome.evidence == .silence))
            return .forward
        } catch {
            logger.warning("cannot set up a connection from \(channel.remoteAddress?.description ?? "?"): \(error)")
            channel.close(promise: nil)
            return .drop
        }
    }

    private func handleJoin(_ join: Frame.Join, handler: any SubflowTransport, machine: SubflowStateMachine) {
        guard let engine = sessions[join.token] else { return refuse(handler, .unknownToken, "") }
        guard let local = handler.localAddress, let remote = handler.remoteAddress else { return }
        switch engine.verifyJoin(join, local: local, remote: remote) {
        case .refused(let reason):
            refuse(handler, reason, "")
        case .accepted(let ack):
            engine.installKeys(on: handler)
            handler.write(.joinAck(ack))
            var established = machine
            established.handshakeCompleted()
            engine.adoptEstablished(handler, machine: established, local: local, remote: remote, backup: join.backup)
        }
    }

    func subflowReadComplete(_ handler: any SubflowTransport) {}
    func subflowWritabilityChanged(_ handler: any SubflowTransport, writable: Bool) {}
    func subflowInputClosed(_ handler: any SubflowTransport) { handler.writeAndClose(nil) }
    func subflowClosed(_ handler: any SubflowTransport, error: (any Error)?) {
        pending.removeValue(forKey: ObjectIdentifier(handler))
        verifying.removeValue(forKey: ObjectIdentifier(handler))
        handler.delegate = nil
    }

    /// What a listener holds per connection and per session, for tests that check it stays bounded.
    var stateCounts: (pending: Int, verifying: Int, sessions: Int, ready: Int) { (pending.count, verifying.count, sessions.count, ready.count) }
}

struct PendingVerification {
    static let maxQueuedFrames = 16
    let handler: any SubflowTransport
    var machine: SubflowStateMachine
    let open: Frame.Open
    let accept: Frame.Accept
    let keys: SessionKeys
    let local: SocketAddress
    let remote: SocketAddress
    /// Names its handshake timeout (`ListenerState.handshakeDeadlines`).
    let serial: UInt64
    var identity: Frame.Identity?
    /// The opener's first frames after ACCEPT (normally its DATA_ACK alone), for the session.
    var frames: [Frame] = []
    /// Started at OPEN when the opener announced its window, else at its first frame after ACCEPT.
    var verificationStarted = false
}

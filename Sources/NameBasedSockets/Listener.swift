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

    private init(localName: String, port: Int, boundAddresses: [SocketAddress], loop: any EventLoop, state: NIOLoopBound<ListenerState>, channels: [any Channel]) {
        self.localName = localName
        self.port = port
        self.boundAddresses = boundAddresses
        self.loop = loop
        self.state = state
        self.channels = channels
    }

    static func start(localName: String, port: Int, options: NBSOptions) async throws -> Listener {
        let loop = options.eventLoopGroup.next()
        let state = try await loop.submit { NIOLoopBound(ListenerState(loop: loop, localName: localName, options: options), eventLoop: loop) }.get()
        var candidates = try options.bindAddresses ?? [SocketAddress(ipAddress: "::", port: port)]
        var channels: [any Channel] = []
        var lastError: (any Error)?
        var fellBack = options.bindAddresses != nil
        while !candidates.isEmpty {
            let address = candidates.removeFirst()
            do {
                let channel = try await ServerBootstrap(group: loop)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: 256)
                    .childChannelInitializer { channel in
                        guard options.acceptLegacyClients else {
                            return SubflowConnector.configure(channel).flatMapThrowing {
                                let handler = try channel.pipeline.syncOperations.handler(type: SubflowHandler.self)
                                state.value.newConnection(handler, channel: channel)
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
        return Listener(localName: localName, port: bound.first?.port ?? port, boundAddresses: bound, loop: loop, state: state, channels: channels)
    }

    /// The next session addressed to this listener's name.
    public func accept() async throws -> Session {
        let state = self.state
        return try await loop.flatSubmit { state.value.accept() }.get()
    }

    /// Stops accepting; sessions already accepted go on.
    public func close() async {
        for channel in channels { try? await channel.close() }
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
    private var pending: [ObjectIdentifier: (handler: SubflowHandler, machine: SubflowStateMachine, timeout: Scheduled<Void>)] = [:]
    private var ready = CircularBuffer<Session>()
    private var waiters = CircularBuffer<EventLoopPromise<Session>>()
    private var closed = false
    private let logger = Logger(label: "nbs.listener")
    private(set) var refusals = 0

    init(loop: any EventLoop, localName: String, options: NBSOptions) {
        self.loop = loop
        self.localName = localName
        self.options = options
    }

    func newConnection(_ handler: SubflowHandler, channel: any Channel) {
        handler.delegate = self
        let key = ObjectIdentifier(handler)
        let bound = NIOLoopBound(self, eventLoop: loop)
        let timeout = loop.scheduleTask(in: options.handshakeTimeout) {
            if let entry = bound.value.pending.removeValue(forKey: key) {
                entry.handler.writeAndClose(.abort(.init(reason: .timeout, message: "no OPEN or JOIN in time")))
            }
        }
        pending[key] = (handler, .listenerSide(), timeout)
    }

    func accept() -> EventLoopFuture<Session> {
        if let session = ready.popFirst() { return loop.makeSucceededFuture(session) }
        if closed { return loop.makeFailedFuture(NBSError.listenerClosed) }
        let promise = loop.makePromise(of: Session.self)
        waiters.append(promise)
        return promise.futureResult
    }

    func close() {
        closed = true
        for waiter in waiters { waiter.fail(NBSError.listenerClosed) }
        waiters.removeAll()
    }

    private func refuse(_ handler: SubflowHandler, _ reason: CloseReason, _ message: String) {
        refusals += 1
        logger.info("refused a subflow from \(handler.channel?.remoteAddress?.description ?? "?"): \(reason) \(message)")
        handler.writeAndClose(.abort(.init(reason: reason, message: message)))
    }

    func subflow(_ handler: SubflowHandler, received frame: Frame) {
        let key = ObjectIdentifier(handler)
        guard var entry = pending.removeValue(forKey: key) else { return }
        entry.timeout.cancel()
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

    private func handleOpen(_ open: Frame.Open, handler: SubflowHandler, machine: SubflowStateMachine) {
        guard !closed else { return refuse(handler, .shuttingDown, "listener closing") }
        guard canonicalName(open.destinationName) == canonicalName(localName) else {
            return refuse(handler, .nameNotServed, "this listener serves \(localName), not \(open.destinationName)")
        }
        guard ready.count < options.acceptBacklog else { return refuse(handler, .resourceLimit, "accept backlog full") }
        guard let channel = handler.channel, let local = channel.localAddress, let remote = channel.remoteAddress else { return }
        var token = UInt64.random(in: 1 ... .max)
        while sessions[token] != nil { token = UInt64.random(in: 1 ... .max) }
        let accept: Frame.Accept
        let keys: SessionKeys
        do {
            (accept, keys) = try ServerHandshake.accept(open, serverName: localName, token: token, receiveWindow: UInt32(clamping: options.receiveCapacity))
        } catch {
            return refuse(handler, .protocolViolation, "\(error)")
        }
        handler.write(.accept(accept))
        let engine = SessionEngine(loop: loop, role: .listener, localName: localName, peerName: open.sourceName, port: local.port ?? 0,
                                   options: options, keys: keys, token: token, peerInitialWindow: 0, addressBook: LocalAddressBook.current(monitor: options.interfaceMonitor),
                                   peerAddresses: [remote])
        sessions[token] = engine
        let bound = NIOLoopBound(self, eventLoop: loop)
        engine.onTerminate = { bound.value.sessions[token] = nil }
        var established = machine
        established.handshakeCompleted()
        engine.adoptEstablished(handler, machine: established, local: local, remote: remote, backup: false)
        engine.startPathManagement()
        deliver(Session(engine: engine))
    }

    private func deliver(_ session: Session) {
        if let waiter = waiters.popFirst() { waiter.succeed(session) } else { ready.append(session) }
    }

    /// A new connection's first bytes (or its silence) told what it is: NBS connections go on to
    /// OPEN or JOIN, anything else becomes a legacy session named after its address.
    func classified(_ outcome: FirstBytesClassifier.Outcome, channel: any Channel) -> FirstBytesClassifier.Disposition {
        do {
            guard outcome.verdict == .legacy else {
                try SubflowConnector.addSubflowHandlers(channel)
                newConnection(try channel.pipeline.syncOperations.handler(type: SubflowHandler.self), channel: channel)
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

    private func handleJoin(_ join: Frame.Join, handler: SubflowHandler, machine: SubflowStateMachine) {
        guard let engine = sessions[join.token] else { return refuse(handler, .unknownToken, "") }
        guard let channel = handler.channel, let local = channel.localAddress, let remote = channel.remoteAddress else { return }
        switch engine.verifyJoin(join) {
        case .refused(let reason):
            refuse(handler, reason, "")
        case .accepted(let ack):
            handler.write(.joinAck(ack))
            var established = machine
            established.handshakeCompleted()
            engine.adoptEstablished(handler, machine: established, local: local, remote: remote, backup: join.backup)
        }
    }

    func subflowReadComplete(_ handler: SubflowHandler) {}
    func subflowWritabilityChanged(_ handler: SubflowHandler, writable: Bool) {}
    func subflowInputClosed(_ handler: SubflowHandler) { handler.writeAndClose(nil) }
    func subflowClosed(_ handler: SubflowHandler, error: (any Error)?) {
        pending.removeValue(forKey: ObjectIdentifier(handler))?.timeout.cancel()
        handler.delegate = nil
    }
}

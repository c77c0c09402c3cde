import NBSProtocol
import NIOCore
import NIOPosix

/// Entry points: `NBS.open` and `NBS.listen`, by name.
public enum NBS {
    /// Opens a session from `localName` to `peerName`. The peer's name is resolved to all of its
    /// addresses; the first subflow runs OPEN/ACCEPT from the first reachable (local, remote) pair,
    /// then the rest of the full mesh JOINs in the background.
    public static func open(localName: String, peerName: String, port: Int, options: NBSOptions = NBSOptions()) async throws -> Session {
        try validate(localName)
        try validate(peerName)
        guard (1...65535).contains(port) else { throw NBSError.connectFailed(peer: peerName, reason: "port \(port) is out of range") }
        let remotes = try await options.resolver.resolve(peerName, port: port)
        let book = LocalAddressBook.current(monitor: options.interfaceMonitor)
        var pairs: [(SocketAddress, SocketAddress)] = []
        for remote in remotes {
            let locals = options.localAddresses?.filter { $0.sameFamily(remote) } ?? book.usable(towards: remote)
            for local in locals { pairs.append((local, remote)) }
        }
        guard !pairs.isEmpty else { throw NBSError.noUsableAddressPairs(peer: peerName) }
        let loop = options.eventLoopGroup.next()
        var failures: [String] = []
        // One attempt per remote address, from its first local address: a peer that answers but
        // refuses is final; one that cannot be reached is tried at its next address.
        var triedRemotes = Set<String>()
        for (local, remote) in pairs where !triedRemotes.contains(remote.hostString) {
            triedRemotes.insert(remote.hostString)
            do {
                return try await OpenAttempt.run(on: loop, local: local, remote: remote, localName: localName, peerName: peerName,
                                                 port: port, options: options, book: book, peerAddresses: remotes)
            } catch let error as NBSError {
                switch error {
                case .refused, .handshakeFailed, .protocolViolation: throw error
                default: failures.append("\(remote.hostString): \(error)")
                }
            } catch {
                failures.append("\(remote.hostString): \(readableSocketError(error))")
            }
        }
        throw NBSError.connectFailed(peer: peerName, reason: failures.joined(separator: "; "))
    }

    /// Listens for sessions addressed to `localName` on `port`.
    public static func listen(localName: String, port: Int, options: NBSOptions = NBSOptions()) async throws -> Listener {
        try validate(localName)
        return try await Listener.start(localName: localName, port: port, options: options)
    }

    static func validate(_ name: String) throws {
        guard !name.isEmpty, name.utf8.count <= NBSWire.maxNameLength,
            !name.contains(where: { $0.isWhitespace || $0 == "/" })
        else { throw NBSError.invalidName(name) }
    }
}

/// The opener's first subflow: connect, OPEN, wait for ACCEPT (or a refusal).
final class OpenAttempt: SubflowDelegate {
    private let promise: EventLoopPromise<Frame.Accept>
    private var machine = SubflowStateMachine.openerSide(joining: false)

    init(promise: EventLoopPromise<Frame.Accept>) { self.promise = promise }

    static func run(on loop: any EventLoop, local: SocketAddress, remote: SocketAddress, localName: String, peerName: String, port: Int,
                    options: NBSOptions, book: LocalAddressBook, peerAddresses: [SocketAddress]) async throws -> Session {
        let channel = try await SubflowConnector.connect(on: loop, from: local, to: remote, options: options).get()
        let future: EventLoopFuture<Session> = loop.flatSubmit {
            let handler: SubflowHandler
            do { handler = try channel.pipeline.syncOperations.handler(type: SubflowHandler.self) } catch { return loop.makeFailedFuture(error) }
            let handshake = ClientHandshake(sourceName: localName, destinationName: peerName, port: UInt16(port))
            let promise = loop.makePromise(of: Frame.Accept.self)
            let attempt = OpenAttempt(promise: promise)
            handler.delegate = attempt
            handler.handshakeSentAt = .now()
            handler.write(.open(handshake.open))
            let timeout = loop.scheduleTask(in: options.handshakeTimeout) {
                promise.fail(NBSError.connectFailed(peer: peerName, reason: "no ACCEPT within \(options.handshakeTimeout)"))
            }
            let boundHandler = NIOLoopBound(handler, eventLoop: loop)
            return promise.futureResult.flatMapThrowing { accept in
                timeout.cancel()
                let handler = boundHandler.value
                let keys: SessionKeys
                do {
                    keys = try handshake.complete(with: accept)
                } catch {
                    handler.writeAndClose(.abort(.init(reason: .authenticationFailed, message: "\(error)")))
                    throw NBSError.handshakeFailed("\(error)")
                }
                let engine = SessionEngine(loop: loop, role: .opener, localName: localName, peerName: peerName, port: port, options: options,
                                           keys: keys, token: accept.token, peerInitialWindow: accept.receiveWindow, addressBook: book,
                                           peerAddresses: peerAddresses)
                var machine = SubflowStateMachine.openerSide(joining: false)
                machine.handshakeCompleted()
                let rtt = handler.handshakeSentAt.map { Double((NIODeadline.now() - $0).nanoseconds) / 1e6 }
                engine.adoptEstablished(handler, machine: machine, local: channel.localAddress ?? local, remote: remote, backup: false, rttSample: rtt)
                engine.startPathManagement()
                return Session(engine: engine)
            }.flatMapErrorThrowing { error in
                timeout.cancel()
                channel.close(promise: nil)
                throw error
            }
        }
        return try await future.get()
    }

    func subflow(_ handler: SubflowHandler, received frame: Frame) {
        switch machine.receive(frame) {
        case .handshake(.accept(let accept)):
            machine.handshakeCompleted()
            promise.succeed(accept)
        case .peerAborted(let close):
            promise.fail(NBSError.refused(reason: close.reason, message: close.message))
        case .protocolViolation(let why):
            promise.fail(NBSError.protocolViolation(why))
        default:
            promise.fail(NBSError.protocolViolation("unexpected \(frame.type) before ACCEPT"))
        }
    }

    func subflowReadComplete(_ handler: SubflowHandler) {}
    func subflowWritabilityChanged(_ handler: SubflowHandler, writable: Bool) {}
    func subflowInputClosed(_ handler: SubflowHandler) {
        promise.fail(NBSError.connectFailed(peer: "", reason: "the peer closed the connection during the handshake"))
    }
    func subflowClosed(_ handler: SubflowHandler, error: (any Error)?) {
        promise.fail(NBSError.connectFailed(peer: "", reason: error.map { "\($0)" } ?? "connection closed during the handshake"))
    }
}


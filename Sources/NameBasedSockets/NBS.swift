import Logging
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
        // A peer known to be legacy gets no NBS bytes at all.
        let plainOnly = options.legacyFallback == .legacyOnly || (options.legacyFallback == .fallback && options.legacyPeers.isLegacy(peerName, port: port))
        for (local, remote) in pairs where !triedRemotes.contains(remote.hostString) {
            triedRemotes.insert(remote.hostString)
            do {
                if plainOnly {
                    return try await LegacyConnection.connect(on: loop, from: local, to: remote, localName: localName, peerName: peerName, port: port, options: options)
                }
                return try await OpenAttempt.run(on: loop, local: local, remote: remote, localName: localName, peerName: peerName,
                                                 port: port, options: options, book: book, peerAddresses: remotes)
            } catch let error as NBSError {
                switch error {
                case .refused, .handshakeFailed, .protocolViolation, .legacyPeer: throw error
                default: failures.append("\(remote.hostString): \(error)")
                }
            } catch {
                failures.append("\(remote.hostString): \(error)")
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
    private var handler: SubflowHandler?

    init(promise: EventLoopPromise<Frame.Accept>) { self.promise = promise }

    static func run(on loop: any EventLoop, local: SocketAddress, remote: SocketAddress, localName: String, peerName: String, port: Int,
                    options: NBSOptions, book: LocalAddressBook, peerAddresses: [SocketAddress]) async throws -> Session {
        let promise = loop.makePromise(of: Frame.Accept.self)
        let boundAttempt = try await loop.submit { NIOLoopBound(OpenAttempt(promise: promise), eventLoop: loop) }.get()
        let channel: any Channel
        do {
            // A server that speaks first may do so as soon as TCP connects: the attempt and the
            // classifier are in place before that.
            channel = try await SubflowConnector.connect(on: loop, from: local, to: remote, options: options) { channel in
                let attempt = boundAttempt.value
                let handler = try channel.pipeline.syncOperations.handler(type: SubflowHandler.self)
                attempt.handler = handler
                handler.delegate = attempt
                try attempt.watchForLegacyServer(channel: channel, handler: handler, localName: localName, peerName: peerName, port: port, options: options)
            }.get()
        } catch {
            promise.fail(error)
            throw error
        }
        let future: EventLoopFuture<Session> = loop.flatSubmit {
            let attempt = boundAttempt.value
            guard let handler = attempt.handler else {
                return loop.makeFailedFuture(NBSError.connectFailed(peer: peerName, reason: "the connection was not set up"))
            }
            let handshake = ClientHandshake(sourceName: localName, destinationName: peerName, port: UInt16(port))
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
                if case LegacyServer.adopted = error {} else { channel.close(promise: nil) }
                throw error
            }
        }
        do {
            return try await future.get()
        } catch let legacy as LegacyServer {
            switch legacy {
            case .adopted(let session):
                return session
            case .reconnect:
                return try await LegacyConnection.connect(on: loop, from: local, to: remote, localName: localName, peerName: peerName, port: port, options: options)
            }
        }
    }

    /// How the attempt ends when the server turned out not to speak NBS and fallback is allowed.
    enum LegacyServer: Error {
        /// It answered with its own bytes: the session goes on, as plain TCP, on this connection.
        case adopted(Session)
        /// It closed, stayed silent or echoed: a fresh plain connection, with no NBS bytes on it.
        case reconnect
    }

    /// Puts a classifier in front of the frame reader, so that a server's first bytes (or its
    /// silence, or its close) are seen before they could be taken for frames. With `.nbsOnly` a
    /// legacy server fails the open with `NBSError.legacyPeer`; with `.fallback` the peer is
    /// remembered as legacy and the session falls back to plain TCP.
    func watchForLegacyServer(channel: any Channel, handler: SubflowHandler, localName: String, peerName: String,
                              port: Int, options: NBSOptions) throws {
        let fallback = options.legacyFallback == .fallback
        let silence = fallback ? options.legacyDetectionDelay : nil
        let promise = self.promise
        let boundHandler = NIOLoopBound(handler, eventLoop: channel.eventLoop)
        let classifier = FirstBytesClassifier(side: .opener, silence: silence, atLeastConnectTimes: 4) { outcome, context in
            if outcome.verdict == .nbs { return .forward }
            let evidence: String =
                switch (outcome.verdict, outcome.evidence) {
                case (.echo, _): "it sent our own OPEN back (an echo server)"
                case (_, .bytes): "it answered with non-NBS bytes"
                case (_, .closed): "it closed the connection without answering"
                case (_, .silence): "it did not answer within \(outcome.waited.map { "\($0.nanoseconds / 1_000_000) ms" } ?? "the handshake timeout")"
                }
            guard fallback else {
                promise.fail(NBSError.legacyPeer(peer: peerName, evidence: evidence))
                return .drop
            }
            options.legacyPeers.remember(peerName, port: port)
            Logger(label: "nbs.open").info("\(peerName):\(port) does not speak NBS (\(evidence)): falling back to plain TCP")
            guard outcome.verdict == .legacy, outcome.evidence == .bytes else {
                promise.fail(LegacyServer.reconnect)
                return .drop
            }
            // The server has seen our preamble and OPEN and answered them: its answer belongs to
            // the application, on this very connection.
            do {
                let handler = boundHandler.value
                handler.delegate = nil
                let sync = context.pipeline.syncOperations
                sync.removeHandler(handler, promise: nil)
                sync.removeHandler(try sync.handler(type: FrameReader.self), promise: nil)
                let session = try LegacyConnection.adopt(context.channel, role: .opener, localName: localName, peerName: peerName, port: port, options: options)
                promise.fail(LegacyServer.adopted(session))
                return .forward
            } catch {
                promise.fail(NBSError.connectFailed(peer: peerName, reason: "cannot fall back to plain TCP: \(error)"))
                return .drop
            }
        }
        try channel.pipeline.syncOperations.addHandler(classifier, position: .first)
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


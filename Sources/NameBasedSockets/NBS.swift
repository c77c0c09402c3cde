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
        let pairs = PathPlanner.openAttempts(locals: options.localAddresses ?? book.addresses, remotes: remotes)
        guard !pairs.isEmpty else { throw NBSError.noUsableAddressPairs(peer: peerName) }
        let loop = options.eventLoopGroup.next()
        // A peer known to be legacy gets no NBS bytes at all.
        let plainOnly = options.legacyFallback == .legacyOnly || (options.legacyFallback == .fallback && options.legacyPeers.isLegacy(peerName, port: port))
        // Plain connects are TCP's whatever the transport: the UDP floor is not theirs.
        let stagger = pairs.count > 1 ? (plainOnly ? options.openAttemptDelay : options.effectiveOpenAttemptDelay) : nil
        return try await OpenRace.first(of: pairs, on: loop, stagger: stagger, peerName: peerName) { race, index, pair, racing in
            if plainOnly {
                return LegacyConnection.connect(on: loop, from: pair.local, to: pair.remote, localName: localName, peerName: peerName,
                                                port: port, options: options, race: (race, index))
            }
            return OpenAttempt.start(on: loop, local: pair.local, remote: pair.remote, localName: localName, peerName: peerName, port: port,
                                     options: options, racing: racing, book: book, peerAddresses: remotes, race: race, index: index)
        }
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

/// The opener's first subflow: connect, OPEN, wait for ACCEPT (or a refusal), verify the
/// listener's name, prove our own identity, then wait for the listener's verdict on ours: its
/// first frame after ACCEPT is a DATA_ACK when it admits the session, an ABORT when it refuses.
final class OpenAttempt: SubflowDelegate, OpenRaceEntrant {
    struct Accepted {
        var accept: Frame.Accept
        var identity: Frame.Identity?
    }

    private let accepted: EventLoopPromise<Accepted>
    private let admitted: EventLoopPromise<Frame>
    private var machine = SubflowStateMachine.openerSide(joining: false)
    private var listenerIdentity: Frame.Identity?
    private var handler: (any SubflowTransport)?
    /// A TCP attempt's channel, from before its connect completes: so that a race it lost can close it.
    private(set) var channel: (any Channel)?
    private var abandoned = false

    init(accepted: EventLoopPromise<Accepted>, admitted: EventLoopPromise<Frame>) {
        self.accepted = accepted
        self.admitted = admitted
    }

    /// Whichever stage is still open fails; completing a completed promise does nothing.
    func fail(_ error: any Error) {
        accepted.fail(error)
        admitted.fail(error)
    }

    /// A Fast Open connect returned before its SYN left: the OPEN goes in it.
    var connectDeferred: Bool { handler?.connectDeferred ?? false }

    /// Another attempt won the race, or the open ended: this one closes, whatever stage it is at.
    func abandon(_ error: any Error) {
        abandoned = true
        fail(error)
        // A connection that is up closes as an NBS one (`writeAndClose`); one still connecting, at once.
        if let channel, channel.isActive, let handler { handler.writeAndClose(nil) } else { channel?.close(promise: nil) }
    }

    /// On `loop`: the whole attempt is one future chain there. Each hop between the caller's task and
    /// the loop wakes a thread (20-60 µs here), a round trip's worth on a short path.
    /// A racer (`racing`) never sends its OPEN in a Fast Open SYN: only a connection known to be up
    /// may carry one. The session it makes uses Fast Open for its JOINs all the same.
    static func start(on loop: any EventLoop, local: SocketAddress, remote: SocketAddress, localName: String, peerName: String, port: Int,
                      options: NBSOptions, racing: Bool, book: LocalAddressBook, peerAddresses: [SocketAddress], race: OpenRace,
                      index: Int) -> EventLoopFuture<Session> {
        let accepted = loop.makePromise(of: Accepted.self)
        let admitted = loop.makePromise(of: Frame.self)
        let boundAttempt = NIOLoopBound(OpenAttempt(accepted: accepted, admitted: admitted), eventLoop: loop)
        race.register(index, boundAttempt.value)
        let connected: EventLoopFuture<Void>
        switch options.transport {
        case .tcp:
            // A server that speaks first may do so as soon as TCP connects: the attempt and the
            // classifier are in place before that.
            var connectOptions = options
            if racing { connectOptions.tcpFastOpen = false }
            connected = SubflowConnector.connect(on: loop, from: local, to: remote, options: connectOptions) { channel in
                let attempt = boundAttempt.value
                attempt.channel = channel
                if attempt.abandoned { throw OpenRace.Superseded(connected: false) }
                let handler = try channel.pipeline.syncOperations.handler(type: SubflowHandler.self)
                attempt.handler = handler
                handler.delegate = attempt
                try attempt.watchForLegacyServer(channel: channel, handler: handler, localName: localName, peerName: peerName, port: port, options: options)
            }.flatMap { _ in
                // OPEN only if no other attempt has it on the wire; a loser closes having sent only the preamble.
                race.claim(index).flatMapError { error in
                    boundAttempt.value.abandon(error)
                    return loop.makeFailedFuture(error)
                }
            }
        case .udp:
            // UDP has no legacy servers to tell apart: a plain UDP service ignores the OPEN.
            connected = DatagramSubflow.connect(on: loop, from: local, to: remote, options: options) { subflow in
                boundAttempt.value.handler = subflow
                subflow.delegate = boundAttempt.value
            }.map { _ in () }
        }
        // Our ephemeral key is made while TCP's handshake is on the wire, not after it.
        let clientHandshake = ClientHandshake(sourceName: localName, destinationName: peerName, port: UInt16(port),
                                              receiveWindow: options.admitsAtOpen(peerName) ? UInt32(clamping: options.receiveCapacity) : nil)
        return connected.flatMapError { error in
            accepted.fail(error)
            admitted.fail(error)
            return loop.makeFailedFuture(error)
        }.flatMap {
            handshake(clientHandshake, boundAttempt, on: loop, local: local, remote: remote, localName: localName, peerName: peerName, port: port,
                      options: options, book: book, peerAddresses: peerAddresses, race: race, index: index)
        }.flatMapError { error in
            switch error {
            case LegacyServer.adopted(let session):
                return loop.makeSucceededFuture(session)
            case LegacyServer.reconnect:
                return LegacyConnection.connect(on: loop, from: local, to: remote, localName: localName, peerName: peerName, port: port, options: options)
            default:
                return loop.makeFailedFuture(error)
            }
        }
    }

    /// OPEN on the connected subflow, then ACCEPT, verification and the verdict, on the loop.
    private static func handshake(_ handshake: ClientHandshake, _ boundAttempt: NIOLoopBound<OpenAttempt>, on loop: any EventLoop, local: SocketAddress, remote: SocketAddress,
                                  localName: String, peerName: String, port: Int, options: NBSOptions, book: LocalAddressBook,
                                  peerAddresses: [SocketAddress], race: OpenRace, index: Int) -> EventLoopFuture<Session> {
        let attempt = boundAttempt.value
        let accepted = attempt.accepted, admitted = attempt.admitted
        guard let handler = attempt.handler else {
            return loop.makeFailedFuture(NBSError.connectFailed(peer: peerName, reason: "the connection was not set up"))
        }
        handler.handshakeSentAt = .now()
        handler.write(.open(handshake.open))
        // Left to fire after the handshake ends (failing completed promises does nothing): NIO
        // cancels a scheduled task by a linear search of its heap.
        let budget = SubflowConnector.handshakeBudget(options, connectDeferred: handler.connectDeferred)
        loop.scheduleTask(in: budget) {
            let error = NBSError.connectFailed(peer: peerName, reason: "no ACCEPT and admission within \(budget)")
            accepted.fail(error)
            admitted.fail(error)
        }
        let boundHandler = NIOLoopBound(handler, eventLoop: loop)
        // Over UDP the OPEN is the first datagram, so attempts race whole hellos, and the claim comes
        // with ACCEPT: a UDP listener admits only on the opener's DATA_ACK, which a loser never sends.
        let claimed = options.transport == .udp ? accepted.futureResult.flatMap { accepted in race.claim(index).map { accepted } } : accepted.futureResult
        return claimed.flatMap { accepted -> EventLoopFuture<(SessionKeys, VerificationResult, Frame, Frame.Accept, Double?)> in
            let handler = boundHandler.value
            // OPEN to ACCEPT: one round trip. The verdict comes later, after the listener's lookup.
            let rtt = handler.handshakeSentAt.map { Double((NIODeadline.now() - $0).nanoseconds) / 1e6 }
            let keys: SessionKeys
            do {
                keys = try handshake.complete(with: accepted.accept)
                handler.installKeys(keys, localRole: .client)
            } catch {
                handler.writeAndClose(.abort(.init(reason: .authenticationFailed, message: "\(error)")))
                return loop.makeFailedFuture(NBSError.handshakeFailed("\(error)"))
            }
            let transcript = HandshakeTranscript(open: handshake.open, accept: accepted.accept)
            let signals = SignalAuthenticator(keys: keys, localRole: .client)
            var proven: [UInt8]?
            if let proof = accepted.identity {
                guard let key = transcript.verify(proof, by: .server) else {
                    let why = "the listener's identity proof does not verify for this session"
                    handler.writeAndClose(signals.close(.authenticationFailed, why, abort: true))
                    return loop.makeFailedFuture(NBSError.handshakeFailed(why))
                }
                proven = key
            }
            // The listener's address came from resolving the dialled name, so it is among the
            // name's addresses by construction, unless the name was an address literal.
            let result = NameVerifier.evaluate(PeerEvidence(
                claimedName: peerName, sourceAddress: remote.hostString,
                resolvedAddresses: NameVerifier.isAddressLiteral(peerName) ? nil : peerAddresses.map(\.hostString),
                provenKey: proven, pinnedKey: options.pinnedKey(for: peerName)))
            if let why = NameVerifier.refusal(result, required: options.requiredPeerVerification) {
                Logger(label: "nbs.open").warning("refused listener \(peerName) at \(remote.hostString): \(why)")
                handler.writeAndClose(signals.close(.verificationFailed, why, abort: true))
                return loop.makeFailedFuture(NBSError.verificationFailed(peer: peerName, reason: why))
            }
            if let identity = options.identity {
                handler.write(.identity(identity.prove(transcript, as: .client)), flush: false)
            }
            // Ends our part of the handshake: the listener decides once it has this.
            handler.write(.dataAck(.init(cumulativeAck: 0, window: UInt32(clamping: options.receiveCapacity))))
            return admitted.futureResult.map { (keys, result, $0, accepted.accept, rtt) }
        }.map { (keys: SessionKeys, result: VerificationResult, firstFrame: Frame, accept: Frame.Accept, rtt: Double?) in
            let handler = boundHandler.value
            let engine = SessionEngine(loop: loop, role: .opener, localName: localName, peerName: peerName, port: port, options: options,
                                       keys: keys, token: accept.token, peerInitialWindow: accept.receiveWindow, addressBook: book,
                                       peerAddresses: peerAddresses)
            engine.peerVerification = result.level
            var machine = SubflowStateMachine.openerSide(joining: false)
            machine.handshakeCompleted()
            engine.adoptEstablished(handler, machine: machine, local: handler.localAddress ?? local, remote: remote, backup: false, rttSample: rtt)
            engine.subflow(handler, received: firstFrame)
            engine.startPathManagement()
            return Session(engine: engine)
        }.flatMapErrorThrowing { error in
            if case LegacyServer.adopted = error {} else { boundAttempt.value.handler?.writeAndClose(nil) }
            throw error
        }
    }

    /// With `.nbsOnly`, the server closed without a byte: `error` is the `legacyPeer` verdict,
    /// which `NBS.open` makes final only when no other address is left.
    struct ClosedUnanswered: Error {
        var error: NBSError
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
        // The classifier decides before ACCEPT; whichever stage is open fails with its verdict.
        let accepted = self.accepted, admitted = self.admitted
        let fail: (any Error) -> Void = { accepted.fail($0); admitted.fail($0) }
        let boundHandler = NIOLoopBound(handler, eventLoop: channel.eventLoop)
        let classifier = FirstBytesClassifier(side: .opener, silence: silence, atLeastConnectTimes: 4) { [weak self] outcome, context in
            if outcome.verdict == .nbs { return .forward }
            // We closed it (a lost race, a cancelled open): the server said nothing about itself.
            if self?.abandoned ?? true { return .drop }
            let evidence: String =
                switch (outcome.verdict, outcome.evidence) {
                case (.echo, _): "it sent our own OPEN back (an echo server)"
                case (_, .bytes): "it answered with non-NBS bytes"
                case (_, .closed): "it closed the connection without answering"
                case (_, .silence): "it did not answer within \(outcome.waited.map { "\($0.nanoseconds / 1_000_000) ms" } ?? "the handshake timeout")"
                }
            guard fallback else {
                let error = NBSError.legacyPeer(peer: peerName, evidence: evidence)
                fail(outcome.evidence == .closed && outcome.verdict == .legacy ? ClosedUnanswered(error: error) : error)
                return .drop
            }
            options.legacyPeers.remember(peerName, port: port)
            Logger(label: "nbs.open").info("\(peerName):\(port) does not speak NBS (\(evidence)): falling back to plain TCP")
            guard outcome.verdict == .legacy, outcome.evidence == .bytes else {
                fail(LegacyServer.reconnect)
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
                fail(LegacyServer.adopted(session))
                return .forward
            } catch {
                fail(NBSError.connectFailed(peer: peerName, reason: "cannot fall back to plain TCP: \(error)"))
                return .drop
            }
        }
        try channel.pipeline.syncOperations.addHandler(classifier, position: .first)
    }

    func subflow(_ handler: any SubflowTransport, received frame: Frame) {
        switch machine.receive(frame) {
        case .handshake(.identity(let identity)):
            guard listenerIdentity == nil else { return fail(NBSError.protocolViolation("two IDENTITY frames before ACCEPT")) }
            listenerIdentity = identity
        case .handshake(.accept(let accept)):
            machine.handshakeCompleted()
            accepted.succeed(Accepted(accept: accept, identity: listenerIdentity))
        case .session(let first):
            admitted.succeed(first)
        case .peerAborted(let close):
            fail(NBSError.refused(reason: close.reason, message: close.message))
        case .protocolViolation(let why):
            fail(NBSError.protocolViolation(why))
        default:
            fail(NBSError.protocolViolation("unexpected \(frame.type) before the listener admitted the session"))
        }
    }

    func subflowReadComplete(_ handler: any SubflowTransport) {}
    func subflowWritabilityChanged(_ handler: any SubflowTransport, writable: Bool) {}
    func subflowInputClosed(_ handler: any SubflowTransport) {
        fail(NBSError.connectFailed(peer: "", reason: "the peer closed the connection during the handshake"))
    }
    func subflowClosed(_ handler: any SubflowTransport, error: (any Error)?) {
        // A socket error (a refused Fast Open connect among them) reads as a failed connect.
        if let error = error as? IOError { return fail(error) }
        fail(NBSError.connectFailed(peer: "", reason: error.map { "\($0)" } ?? "connection closed during the handshake"))
    }
}

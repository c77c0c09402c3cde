#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import NBSProtocol
import NIOCore
import NIOPosix

/// The backend of a legacy session: one plain TCP connection, every byte passed through unchanged
/// in both directions. It gives a `Session` the same read/write/finish/close/abort semantics the
/// multipath engine does, with backpressure both ways: reading from the socket stops while
/// `receiveCapacity` bytes wait for the application (plus at most one batch of socket reads), and
/// `write` returns once the channel is writable again.
final class LegacyConnection: ChannelInboundHandler, RemovableChannelHandler, SessionBackend {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let loop: any EventLoop
    let localName: String
    let peerName: String
    let port: Int
    let role: Session.Role
    let events: AsyncStream<SessionEvent>
    private let eventContinuation: AsyncStream<SessionEvent>.Continuation
    private let options: NBSOptions
    private var local: SocketAddress
    private var remote: SocketAddress
    private var announced = false
    /// Taken for legacy because it was silent: if its first bytes turn out to be the NBS magic after
    /// all (an opener whose first segment was lost and sent again late), it is reset rather than
    /// handing NBS frames to the application as data; the opener's handshake fails and it retries.
    private var checkFirstBytesForNBS: Bool
    private var context: ChannelHandlerContext?
    private var received = CircularBuffer<ByteBuffer>()
    private var receivedBytes = 0
    private var readWaiters = CircularBuffer<(maxBytes: Int, wait: LoopWait<[ByteBuffer]?>)>()
    /// Writes whose bytes NIO has, waiting for the connection to become writable again.
    private var writeWaiters = CircularBuffer<LoopWait<Void>>()
    private var closeWaiters: [LoopWait<Void>] = []
    private var inputEnded = false
    private var outputFinished = false
    /// The output is shut down (FIN sent), which happens once every write has reached the socket.
    private var outputShut = false
    /// Completes when the last write has reached the socket.
    private var lastWrite: EventLoopFuture<Void>?
    private var channelClosed = false
    private var failure: NBSError?
    private var bytesSent = 0
    private var bytesReceived = 0
    private let logger = Logger(label: "nbs.legacy")

    init(channel: any Channel, role: Session.Role, localName: String, peerName: String, port: Int, options: NBSOptions, checkFirstBytesForNBS: Bool = false) {
        self.checkFirstBytesForNBS = checkFirstBytesForNBS
        self.loop = channel.eventLoop
        self.role = role
        self.localName = localName
        self.peerName = peerName
        self.port = port
        self.options = options
        // Known once connected: an opener's connection is set up before that (see `connect`).
        let unknown = try! SocketAddress(ipAddress: "0.0.0.0", port: 0)
        self.local = channel.localAddress?.unmapped ?? unknown
        self.remote = channel.remoteAddress?.unmapped ?? unknown
        (events, eventContinuation) = AsyncStream.makeStream(of: SessionEvent.self, bufferingPolicy: .bufferingNewest(1024))
    }

    /// Installs a legacy session last in `channel`'s pipeline and returns it. On the loop.
    static func adopt(_ channel: any Channel, role: Session.Role, localName: String, peerName: String, port: Int,
                      options: NBSOptions, checkFirstBytesForNBS: Bool = false) throws -> Session {
        let connection = LegacyConnection(channel: channel, role: role, localName: localName, peerName: peerName, port: port, options: options,
                                          checkFirstBytesForNBS: checkFirstBytesForNBS)
        let sync = channel.pipeline.syncOperations
        try channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: true)
        try channel.syncOptions?.setOption(.autoRead, value: false)
        // A legacy peer has no NBS probes: TCP keepalive is what finds one whose path vanished
        // (the soak saw silent connections from addresses that had moved away, held for ever).
        try channel.syncOptions?.setOption(.socketOption(.so_keepalive), value: 1)
        try channel.syncOptions?.setOption(.tcpOption(.init(rawValue: 4)), value: 60)  // TCP_KEEPIDLE, s
        try channel.syncOptions?.setOption(.tcpOption(.init(rawValue: 5)), value: 10)  // TCP_KEEPINTVL, s
        try channel.syncOptions?.setOption(.tcpOption(.init(rawValue: 6)), value: 3)   // TCP_KEEPCNT
        try sync.addHandler(connection)
        return Session(legacy: connection)
    }

    /// A plain TCP connection to `remote`: no NBS byte is ever sent on it. The session is in the
    /// pipeline before the connection is up, so a server that speaks first loses nothing. In a
    /// `race`, a connect that another attempt beat is closed before anything is read from it.
    static func connect(on loop: any EventLoop, from local: SocketAddress, to remote: SocketAddress, localName: String, peerName: String,
                        port: Int, options: NBSOptions, race: (OpenRace, Int)? = nil) -> EventLoopFuture<Session> {
        let session = loop.makePromise(of: Session.self)
        let entrant = NIOLoopBound(PlainConnectAttempt(), eventLoop: loop)
        if let (race, index) = race { race.register(index, entrant.value) }
        return ClientBootstrap(group: loop)
            .connectTimeout(options.connectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    entrant.value.channel = channel
                    if entrant.value.abandoned { throw OpenRace.Superseded(connected: false) }
                    try SubflowConnector.setSocketOptionsSync(channel)
                    session.succeed(try adopt(channel, role: .opener, localName: localName, peerName: peerName, port: port, options: options))
                }
            }
            .bind(to: local)
            .connect(to: remote)
            .flatMap { _ in session.futureResult }
            .flatMapError { error in
                session.fail(error)
                return loop.makeFailedFuture(error)
            }
    }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { becameActive(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        becameActive(context: context)
        context.fireChannelActive()
    }

    private func becameActive(context: ChannelHandlerContext) {
        guard !announced else { return }
        announced = true
        if let address = context.channel.localAddress { local = address.unmapped }
        if let address = context.channel.remoteAddress { remote = address.unmapped }
        eventContinuation.yield(.subflowUp(info))
        context.read()
    }

    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = Self.unwrapInboundIn(data)
        // After a failure (an abort, a reset) the connection is going away: nothing more is delivered.
        guard bytes.readableBytes > 0, failure == nil else { return }
        if checkFirstBytesForNBS {
            checkFirstBytesForNBS = false
            if LegacyDetection.classify(bytes.readableBytesView, side: .listener) == .nbs {
                return fail(.connectionLost("an NBS peer whose first bytes came after the legacy detection delay"))
            }
        }
        bytes = bytes.copiedOutIfSmall(allocator: context.channel.allocator)
        bytesReceived += bytes.readableBytes
        receivedBytes += bytes.readableBytes
        received.append(bytes)
        serveReaders()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if receivedBytes < options.receiveCapacity { context.read() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { releaseWriters() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            inputEnded = true
            serveReaders()
            closeIfDone()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if failure == nil, !(inputEnded && outputFinished) {
            failure = .connectionLost("\(error)")
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        channelClosed = true
        // With our side already finished, NIO turns the peer's end of stream into a full close
        // without an inputClosed event; a reset would have come as an error first.
        if !inputEnded, !outputFinished, failure == nil { failure = .connectionLost("the connection closed without an end of stream") }
        inputEnded = true
        let error = failure
        eventContinuation.yield(.subflowDown(info, reason: error.map { "\($0)" } ?? "closed"))
        eventContinuation.yield(error.map { .failed($0) } ?? .closed)
        eventContinuation.finish()
        serveReaders()
        releaseWriters()
        for waiter in closeWaiters { waiter.answer(error.map { .failure($0) } ?? .success(())) }
        closeWaiters.removeAll()
    }

    // MARK: application calls (on the loop)

    func read(maxBytes: Int, for wait: LoopWait<[ByteBuffer]?>) {
        guard !wait.cancelled else { return }
        readWaiters.append((max(1, maxBytes), wait))
        serveReaders()
    }

    func cancelRead(_ wait: LoopWait<[ByteBuffer]?>) {
        if wait.cancel() { readWaiters.removeAll { $0.wait === wait } }
    }

    func write(_ bytes: ByteBuffer, for wait: LoopWait<Void>) {
        guard !wait.cancelled else { return }
        if let failure { return wait.answer(.failure(failure)) }
        guard !outputFinished else { return wait.answer(.failure(NBSError.writeAfterFinish)) }
        guard let context, !channelClosed else { return wait.answer(.failure(NBSError.connectionLost("the connection is closed"))) }
        guard bytes.readableBytes > 0 else { return wait.answer(.success(())) }
        bytesSent += bytes.readableBytes
        let written = loop.makePromise(of: Void.self)
        context.writeAndFlush(Self.wrapOutboundOut(bytes), promise: written)
        lastWrite = written.futureResult
        if context.channel.isWritable { return wait.answer(.success(())) }
        writeWaiters.append(wait)
    }

    /// A waiting write's bytes are NIO's already: it returns normally, as the engine's does once it
    /// has taken some of a write's bytes.
    func cancelWrite(_ wait: LoopWait<Void>) {
        if writeWaiters.contains(where: { $0 === wait }) {
            writeWaiters.removeAll { $0 === wait }
            wait.answer(.success(()))
        } else {
            _ = wait.cancel()
        }
    }

    func finish() {
        guard !outputFinished, failure == nil, context != nil, !channelClosed else { return }
        outputFinished = true
        // Once the peer has ended its side, NIO turns an output shutdown into a full close that
        // drops the writes still queued: so shut down only after the last write reached the socket.
        guard let lastWrite else { return shutDownOutput() }
        let bound = NIOLoopBound(self, eventLoop: loop)
        lastWrite.whenComplete { _ in bound.value.shutDownOutput() }
    }

    private func shutDownOutput() {
        guard !outputShut, let context, !channelClosed else { return }
        outputShut = true
        context.close(mode: .output, promise: nil)
        closeIfDone()
    }

    /// Begins the close even for a caller already cancelled: only its wait is cancelled.
    func close(for wait: LoopWait<Void>) {
        if channelClosed { return wait.answer(failure.map { .failure($0) } ?? .success(())) }
        if !wait.cancelled { closeWaiters.append(wait) }
        finish()
        LoopTimer.once(on: loop, owner: self, in: options.closeTimeout) { connection in
            guard !connection.channelClosed else { return }
            connection.fail(.closeTimedOut)
        }
    }

    func cancelClose(_ wait: LoopWait<Void>) {
        if wait.cancel() { closeWaiters.removeAll { $0 === wait } }
    }

    func abort(reason: CloseReason, message: String) {
        fail(.aborted(reason: reason, message: message))
    }

    var subflowInfos: [SubflowInfo] { [info] }

    var statistics: SessionStatistics {
        SessionStatistics(maxConcurrentSubflows: 1, reinjectedBytes: 0, unacknowledgedBytes: 0, duplicateBytesReceived: 0, rejectedSignals: 0)
    }

    // MARK: internals

    private var info: SubflowInfo {
        SubflowInfo(id: 0, local: local, remote: remote, interface: nil, state: channelClosed ? .closed : .active, rttMilliseconds: nil,
                    bytesSent: bytesSent, bytesReceived: bytesReceived, reinjectedBytes: 0,
                    closeReason: channelClosed ? (failure.map { "\($0)" } ?? "closed") : nil)
    }

    private func serveReaders() {
        while let waiter = readWaiters.first {
            if !received.isEmpty {
                readWaiters.removeFirst()
                let (segments, taken) = received.removeFirstBytes(upTo: waiter.maxBytes)
                let wasFull = receivedBytes >= options.receiveCapacity
                receivedBytes -= taken
                waiter.wait.answer(.success(segments))
                if wasFull, receivedBytes < options.receiveCapacity, !inputEnded { context?.read() }
            } else if inputEnded {
                readWaiters.removeFirst()
                // A connection that failed ends the stream with its error; one that ended cleanly with nil.
                if let failure { waiter.wait.answer(.failure(failure)) } else { waiter.wait.answer(.success(nil)) }
            } else {
                return
            }
        }
    }

    private func releaseWriters() {
        while let waiter = writeWaiters.popFirst() {
            if let failure {
                waiter.answer(.failure(failure))
            } else if channelClosed {
                waiter.answer(.failure(NBSError.connectionLost("the connection is closed")))
            } else {
                waiter.answer(.success(()))
            }
        }
    }

    /// Both directions ended: the connection has nothing left to do.
    private func closeIfDone() {
        if inputEnded, outputShut, !channelClosed, let channel = context?.channel { closeOnNextTick(channel) }
    }

    private func fail(_ error: NBSError) {
        guard !channelClosed else { return }
        if failure == nil { failure = error }
        if case .aborted = error {
            logger.debug("legacy session with \(peerName): \(error)")
        } else {
            logger.info("legacy session with \(peerName) failed: \(error)")
        }
        // A reset, so the peer learns at once that the stream did not end normally.
        guard let channel = context?.channel else { return }
        resetOnNextTick(channel)
    }
}

// An opener that falls back to plain TCP on its first connection takes these out of the pipeline.
extension FrameReader: RemovableChannelHandler {}
extension SubflowHandler: RemovableChannelHandler {}

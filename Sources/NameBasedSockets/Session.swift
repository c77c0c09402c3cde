import NBSProtocol
import NIOCore

/// A name-based, multipath byte stream. Safe to use from any task; its work runs on one event loop.
public final class Session: Sendable {
    public enum Role: String, Sendable { case opener, listener }

    public let localName: String
    public let peerName: String
    public let port: Int
    public let role: Role
    /// How far `peerName` was verified when the session was established (docs/SECURITY.md). JOINs
    /// are authenticated by the session secret, so later subflows, from any address, keep it.
    public let peerVerification: PeerVerification
    /// Subflow, address and lifecycle events. One consumer; the newest 1024 are kept if unread.
    public let events: AsyncStream<SessionEvent>
    /// A plain TCP session with a peer that does not speak NBS: one connection, no multipath, no
    /// mobility, every byte passed through unchanged. A legacy client's `peerName` is its
    /// address's reverse name (`ReverseName`).
    public let isLegacy: Bool
    /// The event loop that runs the session's work, as a task executor. Code run under
    /// `withTaskExecutorPreference(session.taskExecutor) { ... }` reads and writes without a thread
    /// hand-off: each call reaches the session on the loop's own thread and its answer resumes the
    /// task there, as a SwiftNIO handler works. What that code does between calls holds up the
    /// session's I/O, and that of every session and listener on the loop: work that takes long
    /// belongs elsewhere.
    public let taskExecutor: any TaskExecutor
    /// The multipath engine, or for a legacy peer its one plain connection.
    let engine: NIOLoopBound<any SessionBackend>
    let loop: any EventLoop

    init(engine: SessionEngine) {
        self.localName = engine.localName
        self.peerName = engine.peerName
        self.port = engine.port
        self.role = engine.role == .opener ? .opener : .listener
        self.peerVerification = engine.peerVerification
        self.events = engine.events
        self.isLegacy = false
        self.engine = NIOLoopBound(engine, eventLoop: engine.loop)
        self.loop = engine.loop
        self.taskExecutor = EventLoopTaskExecutor(engine.loop)
    }

    init(legacy: LegacyConnection) {
        self.localName = legacy.localName
        self.peerName = legacy.peerName
        self.port = legacy.port
        self.role = legacy.role
        // A legacy peer sends no name at all: the name it has is the one we gave it.
        self.peerVerification = .claimed
        self.events = legacy.events
        self.isLegacy = true
        self.engine = NIOLoopBound(legacy, eventLoop: legacy.loop)
        self.loop = legacy.loop
        self.taskExecutor = EventLoopTaskExecutor(legacy.loop)
    }

    /// Up to `maxBytes` of in-order data; nil once the peer has finished and everything is read.
    /// Cancelling the calling task ends the wait with `CancellationError` and consumes nothing:
    /// the bytes go to the next read.
    public func read(maxBytes: Int = 4 << 20) async throws -> ByteBuffer? {
        // Joined here, in the caller's task, so that the copy does not hold up the event loop.
        try await readSegments(maxBytes: maxBytes).map(ByteBuffer.init(joining:))
    }

    /// The same bytes as `read`, as the slices they arrived in: no copy. For an application that
    /// hands them on (a hash, a file, another channel), like the buffers a SwiftNIO channel reads.
    /// A slice may keep the larger buffer it was read into alive until it is released.
    public func readSegments(maxBytes: Int = 4 << 20) async throws -> [ByteBuffer]? {
        let engine = self.engine
        return try await LoopWait.run(on: loop) { engine.value.read(maxBytes: maxBytes, for: $0) } cancel: { engine.value.cancelRead($0) }
    }

    /// Returns once the session has buffered the bytes (backpressure: it waits while the send
    /// buffer is full). Bytes are delivered exactly once, in order, whichever subflows carry them.
    /// Cancelling the calling task ends the wait: with `CancellationError` if none of the bytes were
    /// taken (the stream is as if the call had not been made), or normally if some were, the rest
    /// following as space opens, so that the stream never has a hole.
    public func write(_ bytes: ByteBuffer) async throws {
        let engine = self.engine
        try await LoopWait.run(on: loop) { engine.value.write(bytes, for: $0) } cancel: { engine.value.cancelWrite($0) }
    }

    public func write(_ bytes: some Sequence<UInt8>) async throws {
        try await write(ByteBuffer(bytes: bytes))
    }

    /// Half-close: a DATA_FIN follows what was written. Reading goes on.
    public func finish() async {
        let engine = self.engine
        try? await loop.submit { engine.value.finish() }.get()
    }

    /// Graceful close: DATA_FIN, then wait until the peer's DATA_FIN arrived, everything was read
    /// and both sides' data is acknowledged. Fails if that takes longer than `closeTimeout`, unless
    /// all that is missing then is the peer's acknowledgement of our DATA_FIN (every byte delivered
    /// both ways; the peer's last DATA_ACK and CLOSE were lost): that ends as closed, as TCP's
    /// LAST_ACK does.
    /// Cancelling the calling task ends only the wait, with `CancellationError`: the close goes on,
    /// bounded by `closeTimeout`; `abort` ends it at once.
    public func close() async throws {
        let engine = self.engine
        try await LoopWait.run(on: loop) { engine.value.close(for: $0) } cancel: { engine.value.cancelClose($0) }
    }

    /// Immediate end: ABORT to the peer on every subflow; buffered data is dropped.
    public func abort(reason: String = "") async {
        let engine = self.engine
        try? await loop.submit { engine.value.abort(reason: .applicationAbort, message: reason) }.get()
    }

    public var subflows: [SubflowInfo] {
        get async {
            let engine = self.engine
            return (try? await loop.submit { engine.value.subflowInfos }.get()) ?? []
        }
    }

    public var statistics: SessionStatistics {
        get async {
            let engine = self.engine
            return (try? await loop.submit { engine.value.statistics }.get()) ?? SessionStatistics()
        }
    }
}

public struct SessionStatistics: Sendable, Equatable {
    public var maxConcurrentSubflows = 0
    public var reinjectedBytes = 0
    /// Sent once more on another subflow while the subflow that carried them was silent with them
    /// in flight (the data the peer waited for first); counted apart from `reinjectedBytes`, as the
    /// first copy stays where it was.
    public var headOfLineCopiedBytes = 0
    /// Replaced subflows whose drain ended before the peer had all they carried (silent, closed,
    /// or out of time), so that the rest was reinjected: the others went without sending anything again.
    public var drainsCutShort = 0
    public var unacknowledgedBytes = 0
    public var duplicateBytesReceived = 0
    /// ADD_ADDR, REMOVE_ADDR, PRIO, CLOSE or ABORT frames dropped because they failed authentication.
    public var rejectedSignals = 0
    /// Received in order and not read by the application yet: at most about `receiveCapacity`,
    /// however long the application does not read.
    public var unreadBytes = 0
}

/// What a `Session` runs on: the multipath engine, or one plain connection with a legacy peer.
/// Called on the backend's event loop only.
protocol SessionBackend: AnyObject {
    func read(maxBytes: Int, for wait: LoopWait<[ByteBuffer]?>)
    func cancelRead(_ wait: LoopWait<[ByteBuffer]?>)
    func write(_ bytes: ByteBuffer, for wait: LoopWait<Void>)
    func cancelWrite(_ wait: LoopWait<Void>)
    func finish()
    func close(for wait: LoopWait<Void>)
    func cancelClose(_ wait: LoopWait<Void>)
    func abort(reason: CloseReason, message: String)
    var subflowInfos: [SubflowInfo] { get }
    var statistics: SessionStatistics { get }
}

extension SessionEngine: SessionBackend {
    var statistics: SessionStatistics {
        SessionStatistics(maxConcurrentSubflows: maxConcurrentSubflows, reinjectedBytes: core.reinjectedBytes,
                          headOfLineCopiedBytes: headOfLineCopiedBytes, drainsCutShort: drainsCutShort, unacknowledgedBytes: core.unacknowledgedBytes, duplicateBytesReceived: core.receive.duplicateBytes,
                          rejectedSignals: rejectedSignals, unreadBytes: core.readableBytes)
    }
}

extension Session {
    /// Test hook: handle `frames` as if they had arrived on subflow `id`, in one pass of the loop.
    func receiveForTesting(_ frames: [Frame], onSubflow id: UInt32) async {
        let engine = self.engine
        try? await loop.submit {
            guard let engine = engine.value as? SessionEngine, let handler = engine.handlerForTesting(id) else { return }
            for frame in frames { engine.subflow(handler, received: frame) }
        }.get()
    }

    /// Test hook: reads waiting in the engine for data.
    func waitingReadsForTesting() async -> Int {
        let engine = self.engine
        return (try? await loop.submit { (engine.value as? SessionEngine)?.waitingReadsForTesting ?? 0 }.get()) ?? 0
    }

    /// Test hook: see SessionEngine.retireBusiestSubflowForTesting.
    func retireBusiestSubflow() async -> Int {
        let engine = self.engine
        return (try? await loop.submit { (engine.value as? SessionEngine)?.retireBusiestSubflowForTesting() ?? 0 }.get()) ?? 0
    }

    /// Test hook: see SessionEngine.replaceBusiestSubflowForTesting.
    func replaceBusiestSubflow() async -> Int {
        let engine = self.engine
        return (try? await loop.submit { (engine.value as? SessionEngine)?.replaceBusiestSubflowForTesting() ?? 0 }.get()) ?? 0
    }

    /// Test hook: reset one subflow's TCP connection, as a failing path would.
    func killSubflow(_ id: UInt32) async {
        let engine = self.engine
        try? await loop.submit { (engine.value as? SessionEngine)?.killSubflow(id) }.get()
    }

    /// Test hook: frames of these types are dropped on arrival, as if lost with the subflow that
    /// carried them.
    func dropArrivingFramesForTesting(_ types: Set<FrameType>) async {
        let engine = self.engine
        try? await loop.submit { (engine.value as? SessionEngine)?.droppedFrameTypesForTesting = types }.get()
    }

    /// Test hook: starts the stall checks now, as a write or a PROBE would.
    func startLivenessChecksForTesting() async {
        let engine = self.engine
        try? await loop.submit { (engine.value as? SessionEngine)?.startLivenessChecksForTesting() }.get()
    }

    /// Test hook: one PROBE round now; returns how many subflows were probed.
    func probeRoundForTesting() async -> Int {
        let engine = self.engine
        return (try? await loop.submit { (engine.value as? SessionEngine)?.probeRoundForTesting() ?? 0 }.get()) ?? 0
    }

    /// Test hook: whether the engine's stall checks are scheduled now.
    func livenessChecksRunningForTesting() async -> Bool { await livenessIntervalForTesting() != nil }

    /// Test hook: how often the engine's stall checks run now (nil: stopped).
    func livenessIntervalForTesting() async -> TimeAmount? {
        let engine = self.engine
        return (try? await loop.submit { (engine.value as? SessionEngine)?.livenessIntervalForTesting }.get()) ?? nil
    }

    /// Test hook: runs `body` on the session's loop with each live subflow of one transport
    /// (`SubflowHandler` for TCP, `DatagramSubflow` for UDP).
    func withSubflowsForTesting<Transport: SubflowTransport>(_ type: Transport.Type, _ body: @escaping @Sendable (Transport) -> Void) async {
        let engine = self.engine
        try? await loop.submit {
            for case let subflow as Transport in (engine.value as? SessionEngine)?.liveTransportsForTesting ?? [] { body(subflow) }
        }.get()
    }
}

/// An application call that waits on an event loop (`accept`, `read`, `write`, `close`): made on the
/// caller's thread, then touched only on the loop. Cancelling the caller's task cancels it there,
/// whichever of the call and the cancellation reaches the loop first; once answered, a cancellation
/// changes nothing.
final class LoopWait<Value: Sendable>: @unchecked Sendable {
    let promise: EventLoopPromise<Value>
    private(set) var cancelled = false
    private(set) var answered = false

    private init(promise: EventLoopPromise<Value>) { self.promise = promise }

    /// `start` queues the wait on the loop (checking `cancelled` first); `cancel` takes it out of
    /// that queue if `cancel()` says it was still waiting.
    static func run(on loop: any EventLoop, _ start: @escaping @Sendable (LoopWait) -> Void,
                    cancel: @escaping @Sendable (LoopWait) -> Void) async throws -> Value {
        let wait = LoopWait(promise: loop.makePromise())
        return try await withTaskCancellationHandler {
            // A task on `loop` (`Session.taskExecutor`) starts the wait in its own turn. One
            // cancelled already has queued its cancellation: the start queues behind it, as
            // from any other thread, so that it finds the wait cancelled and takes nothing.
            if loop.inEventLoop, !Task.isCancelled { start(wait) } else { loop.execute { start(wait) } }
            return try await wait.promise.futureResult.get()
        } onCancel: {
            loop.execute { cancel(wait) }
        }
    }

    /// Does nothing to a wait already answered or cancelled.
    func answer(_ result: Result<Value, any Error>) {
        guard !answered, !cancelled else { return }
        answered = true
        promise.completeWith(result)
    }

    /// Fails the wait with `CancellationError`; false if it was answered or cancelled already.
    func cancel() -> Bool {
        guard !answered, !cancelled else { return false }
        cancelled = true
        promise.fail(CancellationError())
        return true
    }
}

/// An event loop as a Swift task executor (SE-0417): jobs run as the loop's tasks. One per
/// session, so that a preference for it set twice is the same executor, not a hop between two.
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: any EventLoop
    init(_ loop: any EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

import NIOConcurrencyHelpers

/// What a path manager needs from an interface monitor. ``NetlinkInterfaceMonitor`` is the real
/// one; ``ScriptedInterfaceMonitor`` is driven by tests.
public protocol InterfaceMonitor: AnyObject, Sendable {
    /// Begins watching. Idempotent for test doubles; the netlink monitor allows it once.
    func start() throws
    /// A consistent copy of the current links and addresses.
    var snapshot: InterfaceTable { get }
    /// A new stream per access. It first yields ``InterfaceTable/currentStateEvents`` and then
    /// every change, in order, and finishes when the monitor stops.
    var events: AsyncStream<InterfaceEvent> { get }
    /// Calls `handler` for the same sequence ``events`` yields, from a task (never concurrently
    /// with itself). Keep the subscription to cancel it; dropping it does not.
    @discardableResult
    func onEvent(_ handler: @escaping @Sendable (InterfaceEvent) -> Void) -> InterfaceEventSubscription
    /// Stops watching and finishes every stream. Idempotent.
    func stop()
}

extension InterfaceMonitor {
    public var interfaces: [NetworkInterface] { snapshot.interfaces }
    public var usableAddresses: [InterfaceAddress] { snapshot.usableAddresses }

    @discardableResult
    public func onEvent(_ handler: @escaping @Sendable (InterfaceEvent) -> Void) -> InterfaceEventSubscription {
        let stream = events
        return InterfaceEventSubscription(task: Task {
            for await event in stream { handler(event) }
        })
    }
}

/// Handle for an ``InterfaceMonitor/onEvent(_:)`` registration.
public final class InterfaceEventSubscription: Sendable {
    private let task: Task<Void, Never>

    init(task: Task<Void, Never>) { self.task = task }

    public func cancel() { task.cancel() }
}

/// The table plus its subscribers, behind one lock: applying a change and yielding its events
/// happen together, so each subscriber sees the replay of the state and then exactly the changes
/// after it, with nothing lost or doubled.
final class EventHub: Sendable {
    private struct State {
        var table = InterfaceTable()
        var continuations: [UInt64: AsyncStream<InterfaceEvent>.Continuation] = [:]
        var nextID: UInt64 = 0
        var finished = false
    }

    private let state = NIOLockedValueBox(State())

    var snapshot: InterfaceTable { state.withLockedValue { $0.table } }

    /// Mutates the table and delivers whatever events the mutation returns.
    @discardableResult
    func update(_ body: (inout InterfaceTable) -> [InterfaceEvent]) -> [InterfaceEvent] {
        state.withLockedValue { state in
            let events = body(&state.table)
            for event in events {
                for continuation in state.continuations.values { continuation.yield(event) }
            }
            return events
        }
    }

    func subscribe() -> AsyncStream<InterfaceEvent> {
        let (stream, continuation) = AsyncStream.makeStream(of: InterfaceEvent.self, bufferingPolicy: .unbounded)
        let registered: UInt64? = state.withLockedValue { state in
            guard !state.finished else { return nil }
            for event in state.table.currentStateEvents { continuation.yield(event) }
            let id = state.nextID
            state.nextID += 1
            state.continuations[id] = continuation
            return id
        }
        guard let id = registered else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self] _ in
            self?.state.withLockedValue { _ = $0.continuations.removeValue(forKey: id) }
        }
        return stream
    }

    func finish() {
        let continuations = state.withLockedValue { state in
            state.finished = true
            defer { state.continuations = [:] }
            return Array(state.continuations.values)
        }
        for continuation in continuations { continuation.finish() }
    }
}

/// A test double: tests feed it netlink messages (or use the helpers) and it diffs them through
/// the same ``InterfaceTable`` as the real monitor, so subscribers see realistic events.
public final class ScriptedInterfaceMonitor: InterfaceMonitor {
    private let hub = EventHub()

    public init(interfaces: [NetworkInterface] = [], addresses: [InterfaceAddress] = []) {
        hub.update { table in
            _ = table.apply(interfaces.map(NetlinkMessage.newLink) + addresses.map(NetlinkMessage.newAddress))
            return []
        }
    }

    public func start() throws {}

    public var snapshot: InterfaceTable { hub.snapshot }

    public var events: AsyncStream<InterfaceEvent> { hub.subscribe() }

    public func stop() { hub.finish() }

    /// Applies a message as if the kernel had sent it and returns the events it produced.
    @discardableResult
    public func feed(_ message: NetlinkMessage) -> [InterfaceEvent] {
        hub.update { $0.apply(message) }
    }

    @discardableResult
    public func feed(_ messages: [NetlinkMessage]) -> [InterfaceEvent] {
        hub.update { $0.apply(messages) }
    }

    @discardableResult
    public func setInterface(_ interface: NetworkInterface) -> [InterfaceEvent] { feed(.newLink(interface)) }

    @discardableResult
    public func removeInterface(_ interface: NetworkInterface) -> [InterfaceEvent] { feed(.delLink(interface)) }

    @discardableResult
    public func addAddress(_ address: InterfaceAddress) -> [InterfaceEvent] { feed(.newAddress(address)) }

    @discardableResult
    public func removeAddress(_ address: InterfaceAddress) -> [InterfaceEvent] { feed(.delAddress(address)) }
}

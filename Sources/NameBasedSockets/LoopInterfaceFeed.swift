import NBSNetlink
import NIOCore

/// One interface monitor's events for every session on one event loop: one subscription per
/// (loop, monitor) instead of one per session. A subscription is a task and a stream, and each event
/// then woke every session's task and crossed to the loop once per session: 10,000 sessions held
/// 10,000 tasks, and one address change cost 10,000 task wake-ups and 10,000 cross-thread
/// `execute`s. Opening a session also paid a task's creation and the replay's wake-ups.
///
/// A feed lives while it has members, and is made and touched only on its loop's thread.
final class LoopInterfaceFeed {
    struct Membership {
        fileprivate let feed: LoopInterfaceFeed
        fileprivate let id: UInt64

        /// Call on the loop. No event reaches the member after this.
        func cancel() { feed.leave(id) }
    }

    private let loop: any EventLoop
    private let monitor: any InterfaceMonitor
    private var members: [UInt64: (InterfaceEvent) -> Void] = [:]
    private var nextID: UInt64 = 0
    private var subscription: InterfaceEventSubscription?

    private init(loop: any EventLoop, monitor: any InterfaceMonitor) {
        self.loop = loop
        self.monitor = monitor
    }

    /// Call on `loop`. `handler` gets, on the loop and never from within this call, every event
    /// the monitor reports from now on. If the monitor's usable addresses differ from `known` (the
    /// member's view when it was made), the member first gets the monitor's current state as
    /// events, as a new subscriber of the monitor would.
    static func join(_ monitor: any InterfaceMonitor, on loop: any EventLoop, knowing known: LocalAddressBook,
                     _ handler: @escaping (InterfaceEvent) -> Void) -> Membership {
        loop.preconditionInEventLoop()
        let key = ObjectIdentifier(monitor)
        let (feed, isNew) = perThread.withValue { feeds -> (LoopInterfaceFeed, Bool) in
            if let feed = feeds[key] { return (feed, false) }
            let feed = LoopInterfaceFeed(loop: loop, monitor: monitor)
            feeds[key] = feed
            return (feed, true)
        }
        let id = feed.nextID
        feed.nextID += 1
        feed.members[id] = handler
        if isNew {
            // The monitor replays its state to a new subscription: that reaches this member too.
            feed.subscribe()
        } else {
            let state = monitor.snapshot
            if !known.matches(PathPlanner.localAddresses(from: state)) {
                let events = state.currentStateEvents
                let bound = NIOLoopBound(feed, eventLoop: loop)
                loop.execute {
                    for event in events { bound.value.members[id]?(event) }
                }
            }
        }
        return Membership(feed: feed, id: id)
    }

    private func subscribe() {
        let bound = NIOLoopBound(self, eventLoop: loop)
        let loop = self.loop
        subscription = monitor.onEvent { event in
            loop.execute { bound.value.deliver(event) }
        }
    }

    private func deliver(_ event: InterfaceEvent) {
        // A member that leaves because of this event still gets it: it ignores events once closed.
        for handler in members.values { handler(event) }
    }

    private func leave(_ id: UInt64) {
        loop.preconditionInEventLoop()
        guard members.removeValue(forKey: id) != nil, members.isEmpty else { return }
        subscription?.cancel()
        subscription = nil
        let key = ObjectIdentifier(monitor)
        Self.perThread.withValue { feeds in
            if feeds[key] === self { feeds[key] = nil }
        }
    }

    private static let perThread = PerThread<[ObjectIdentifier: LoopInterfaceFeed]> { [:] }
}

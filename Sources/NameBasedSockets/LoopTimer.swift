import HeapModule
import NIOCore
import NIOPosix

/// The one timer every periodic and one-shot timer of the library uses: a deadline, re-armed and
/// stopped freely, that never cancels a NIO task.
///
/// Why: NIO removes a cancelled scheduled task from its event loop's heap by a linear search, so
/// with 20,000 subflows on one loop (10,000 UDP sessions) every `Scheduled.cancel()` and
/// `RepeatedTask.cancel()` walks tens of thousands of entries. A `LoopTimer` instead keeps its
/// deadline itself and leaves its fire times to come: one that finds no deadline due does nothing
/// (or adds the deadline's, lazily, if none is pending earlier). Stopping is `stop()`, which only
/// forgets the deadline; moving the deadline later costs nothing until the earlier fire time comes;
/// moving it earlier adds one more.
///
/// The pending fire times of every timer on a loop wait in that loop's `TimerQueue`, behind one NIO
/// task, rather than as a NIO task each: NIO's heap moves tasks with their closures, a retain and a
/// release per step, and with the keepalive, loss and acknowledgement deadlines of 20,000 UDP
/// subflows on one loop, popping it was a quarter of an idle serve's CPU (perf).
///
/// Confined to its event loop (`assumeIsolated`). The action gets the owner, which the timer holds
/// weakly, so a timer kept in its owner makes no cycle; a pending fire time keeps the timer (not the
/// owner) alive until it is due. Each firing reports how late it ran to the loop's `LoopLag`, which
/// stall detection uses to tell its own loop's lag from a silent path.
final class LoopTimer {
    private let loop: any EventLoop
    private let action: () -> Void
    /// When the action is due; nil: stopped.
    private(set) var deadline: NIODeadline?
    /// Fire times in the loop's queue and not yet come.
    private var scheduled = PendingFireTimes()

    init<Owner: AnyObject>(on loop: any EventLoop, owner: Owner, _ action: @escaping (Owner) -> Void) {
        self.loop = loop
        self.action = { [weak owner] in
            if let owner { action(owner) }
        }
    }

    /// A one-shot deadline nobody needs to stop: the queue keeps the timer until it comes, and the
    /// owner stays free to go before then. A NIO task's closure would keep the owner, and with it
    /// everything the owner holds, until the deadline (a closed session's engine, 30 s).
    static func once<Owner: AnyObject>(on loop: any EventLoop, owner: Owner, in delay: TimeAmount, _ action: @escaping (Owner) -> Void) {
        LoopTimer(on: loop, owner: owner, action).arm(in: delay)
    }

    var isArmed: Bool { deadline != nil }

    /// Runs the action at `deadline`, replacing any deadline set before (earlier or later).
    func arm(at deadline: NIODeadline) {
        self.deadline = deadline
        scheduleIfNeeded()
    }

    func arm(in delay: TimeAmount) { arm(at: .now() + delay) }

    /// Runs the action `delay` from now or up to `slack` later: at the next multiple of `slack` on
    /// the loop's clock, which every timer armed with the same slack in that window shares, so they
    /// fire in one wake-up of the loop rather than one each. For deadlines that need only come
    /// roughly on time: 10,000 idle UDP sessions' keepalive checks woke their loop 2,700 times a
    /// second, and the context switches were a tenth of its CPU (perf).
    func arm(in delay: TimeAmount, slack: TimeAmount) {
        arm(at: Self.coalesced(.now() + delay, slack: slack))
    }

    /// The slack of the timers that need only come roughly on time: keepalive checks, backed-off
    /// probe rounds.
    static let idleGrain = TimeAmount.milliseconds(100)

    static func coalesced(_ deadline: NIODeadline, slack: TimeAmount) -> NIODeadline {
        let step = UInt64(max(1, slack.nanoseconds))
        let due = deadline.uptimeNanoseconds
        return .uptimeNanoseconds((due / step + (due % step == 0 ? 0 : 1)) * step)
    }

    /// Keeps an earlier deadline, else arms at `deadline`.
    func armIfEarlier(at deadline: NIODeadline) {
        if let current = self.deadline, current <= deadline { return }
        arm(at: deadline)
    }

    /// The action will not run until armed again. Nothing is cancelled.
    func stop() { deadline = nil }

    /// Fire times pending, for tests.
    var scheduledCountForTesting: Int { scheduled.count }

    private lazy var queue = TimerQueue.on(loop)

    private func scheduleIfNeeded() {
        guard let deadline, scheduled.insertIfFirst(deadline) else { return }
        queue.add(self, at: deadline)
    }

    /// The queue's call when a fire time of this timer is due.
    fileprivate func fired(_ taskDeadline: NIODeadline) {
        scheduled.remove(taskDeadline)
        guard let deadline else { return }
        let now = NIODeadline.now()
        guard deadline <= now else { return scheduleIfNeeded() }
        LoopLag.record(due: deadline.uptimeNanoseconds, ran: now.uptimeNanoseconds)
        self.deadline = nil
        action()
    }
}

/// Fire times waiting to come, of which a holder needs only the earliest: a time is added only when
/// it comes before all those pending (a few at most), and removed when it comes.
struct PendingFireTimes {
    private var times: [NIODeadline] = []

    var count: Int { times.count }

    /// Adds `time` if none pending comes at or before it; false: one does, nothing to schedule.
    mutating func insertIfFirst(_ time: NIODeadline) -> Bool {
        guard !times.contains(where: { $0 <= time }) else { return false }
        times.append(time)
        return true
    }

    mutating func remove(_ time: NIODeadline) {
        if let index = times.firstIndex(of: time) { times.remove(at: index) }
    }
}

/// Every `LoopTimer` fire time on one event loop, in a heap of (deadline, order of arrival, timer),
/// with one NIO task at the earliest. Each entry holds its timer retained, as a NIO task
/// would, and gives it up when it comes.
final class TimerQueue {
    private struct Entry: Comparable {
        let deadline: UInt64
        let order: UInt64
        /// Retained by `add`, released when the entry comes: no reference counting as it moves.
        let timer: Unmanaged<LoopTimer>

        static func < (a: Entry, b: Entry) -> Bool { (a.deadline, a.order) < (b.deadline, b.order) }
        static func == (a: Entry, b: Entry) -> Bool { (a.deadline, a.order) == (b.deadline, b.order) }
    }

    private let loop: any EventLoop
    private var heap = Heap<Entry>()
    private var arrivals: UInt64 = 0
    /// When the NIO tasks scheduled and not yet run will wake the queue.
    private var wakeups = PendingFireTimes()

    private init(loop: any EventLoop) { self.loop = loop }

    /// The queue of this thread's event loop. Call on `loop`.
    static func on(_ loop: any EventLoop) -> TimerQueue {
        perThread.withValue { queue in
            if let queue { return queue }
            let made = TimerQueue(loop: loop)
            queue = made
            return made
        }
    }

    private static let perThread = PerThread<TimerQueue?> { nil }

    var countForTesting: Int { heap.count }

    func add(_ timer: LoopTimer, at deadline: NIODeadline) {
        arrivals &+= 1
        heap.insert(Entry(deadline: deadline.uptimeNanoseconds, order: arrivals, timer: Unmanaged.passRetained(timer)))
        wake(at: deadline)
    }

    private func wake(at deadline: NIODeadline) {
        guard wakeups.insertIfFirst(deadline) else { return }
        loop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in woke(deadline) }
    }

    private func woke(_ at: NIODeadline) {
        wakeups.remove(at)
        let now = NIODeadline.now().uptimeNanoseconds
        var due: [Entry] = []
        while let first = heap.min, first.deadline <= now { due.append(heap.removeMin()) }
        // Fired after they all left the heap: an action may arm timers, which go in for later.
        for entry in due { entry.timer.takeRetainedValue().fired(.uptimeNanoseconds(entry.deadline)) }
        if let first = heap.min { wake(at: .uptimeNanoseconds(first.deadline)) }
    }
}

/// How long this event loop was recently too busy to hear its sockets: the intervals between a
/// timer's deadline and the moment it ran, merged where they overlap. One per loop thread
/// (`current`), written by every `LoopTimer` that fires, and read by stall detection: while the loop
/// was blocked or behind, acknowledgements sat unread in socket buffers, so that time is not a
/// path's silence. A listener's shared UDP socket keeps a record of the same kind for the time its
/// reads kept finding more waiting (`DatagramInbound.backlogLag`), which counts only for the
/// subflows that socket carries.
struct LoopLag {
    /// Lateness below this is scheduling noise, not a blocked loop.
    static let threshold: UInt64 = 20_000_000
    /// Intervals (start, end) in uptime nanoseconds, oldest first, disjoint.
    private(set) var intervals: [(start: UInt64, end: UInt64)] = []
    static let capacity = 32

    /// A timer due at `due` ran at `ran`.
    mutating func record(due: UInt64, ran: UInt64) {
        guard ran > due, ran - due >= Self.threshold else { return }
        if let last = intervals.last, due <= last.end {
            intervals[intervals.count - 1] = (min(last.start, due), max(last.end, ran))
            // A late report can reach back over earlier intervals: merge them too.
            while intervals.count >= 2, intervals[intervals.count - 1].start <= intervals[intervals.count - 2].end {
                let tail = intervals.removeLast()
                let head = intervals.removeLast()
                intervals.append((min(head.start, tail.start), max(head.end, tail.end)))
            }
        } else {
            intervals.append((due, ran))
        }
        if intervals.count > Self.capacity { intervals.removeFirst(intervals.count - Self.capacity) }
    }

    /// Nanoseconds of the window [from, to] during which the loop was blocked, at most
    /// `maximumDiscount`.
    func blocked(from: UInt64, to: UInt64) -> UInt64 {
        guard to > from else { return 0 }
        var total: UInt64 = 0
        for interval in intervals.reversed() {
            if interval.end <= from { break }
            let start = max(interval.start, from)
            let end = min(interval.end, to)
            if end > start { total += end - start }
        }
        return min(total, Self.maximumDiscount)
    }

    /// The most of a silence that lag explains away. Timers each a little late, one after another,
    /// make one interval as long as the overload lasts, yet a loop that is behind still reads its
    /// sockets, a little late: in the debug UDP soak (seed 4242), CPU-bound throughout, a listener's
    /// suspensions came after a median 9.7 s of silence, 9.2 s of it discounted, and 206 of 1,534
    /// at this cap; uncapped, a dead subflow could be held as live for as long as the overload
    /// lasts, and the opener's JOINs refused at the limit meanwhile. Above the longest overload
    /// measured (a listener worked 11 s through 10,000 closes: BENCHMARKS.md, Scale), far below the
    /// 60 s an opener waits for a path.
    static let maximumDiscount: UInt64 = 15_000_000_000

    /// Milliseconds of silence, not counting the time the loop was blocked in it.
    func discounted(silentMs: Int64, now: UInt64) -> Int64 {
        guard silentMs > 0 else { return silentMs }
        let window = UInt64(silentMs) * 1_000_000
        let blockedNs = blocked(from: now > window ? now - window : 0, to: now)
        return silentMs - Int64(blockedNs / 1_000_000)
    }

    /// This record and `other`'s as one: a loop's lag and one socket's backlog.
    func merging(_ other: LoopLag) -> LoopLag {
        guard !other.intervals.isEmpty else { return self }
        guard !intervals.isEmpty else { return other }
        var merged = LoopLag()
        for interval in (intervals + other.intervals).sorted(by: { $0.start < $1.start }) {
            merged.record(due: interval.start, ran: interval.end)
        }
        return merged
    }

    private static let perThread = PerThread { LoopLag() }

    /// This thread's (event loop's) record.
    static var current: LoopLag { perThread.withValue { $0 } }

    /// A timer on this thread due at `due` ran at `ran`.
    static func record(due: UInt64, ran: UInt64) { perThread.withValue { $0.record(due: due, ran: ran) } }
}

/// When a socket's reads keep finding more waiting. NIO reads at most a fixed number of datagrams
/// per wake-up, so a wake-up that read that many most likely left some in the queue: from the first
/// such wake-up until one that emptied the queue, what arrived waited unread.
struct ReadBacklog {
    private var since: UInt64?

    /// A wake-up ended at `now` after `reads` datagrams, of at most `limit`: the interval the socket
    /// has been known to be behind, to report as the loop's lag, or nil if it was not.
    mutating func wakeupEnded(reads: Int, limit: Int, now: UInt64) -> (start: UInt64, end: UInt64)? {
        if reads >= limit {
            let start = since ?? now
            since = start
            return (start, now)
        }
        guard let start = since else { return nil }
        since = nil
        return (start, now)
    }
}

/// A value of each event-loop thread, made there on first use and touched only there (so no lock):
/// what a loop's timers share, as its `LoopLag` and its `LivenessTicker`s.
final class PerThread<Value>: @unchecked Sendable {
    private final class Box {
        var value: Value
        init(_ value: Value) { self.value = value }
    }

    private let variable = ThreadSpecificVariable<Box>()
    private let make: () -> Value

    init(_ make: @escaping () -> Value) { self.make = make }

    func withValue<Result>(_ body: (inout Value) -> Result) -> Result {
        let box = variable.currentValue ?? {
            let box = Box(make())
            variable.currentValue = box
            return box
        }()
        return body(&box.value)
    }
}

/// Deadlines kept in order for one `LoopTimer` to serve them all: a listener's handshake timeouts,
/// each `handshakeTimeout` after its start, so they arrive in order and insertion is at the back.
/// Entries are never removed early; each carries a serial that its owner compares with what it
/// still holds under that key when it expires, so a key reused after its entry ended (an
/// `ObjectIdentifier` of a freed handler) is not expired by its predecessor's deadline.
struct DeadlineQueue<Key: Hashable> {
    private var entries = CircularBuffer<(key: Key, serial: UInt64, deadline: NIODeadline)>()

    var count: Int { entries.count }
    var next: NIODeadline? { entries.first?.deadline }

    mutating func add(_ key: Key, serial: UInt64, deadline: NIODeadline) {
        var index = entries.endIndex
        while index > entries.startIndex, entries[entries.index(before: index)].deadline > deadline {
            index = entries.index(before: index)
        }
        if index == entries.endIndex { entries.append((key, serial, deadline)) } else { entries.insert((key, serial, deadline), at: index) }
    }

    /// Removes and returns the entries due at `now`, oldest first.
    mutating func popExpired(now: NIODeadline) -> [(key: Key, serial: UInt64)] {
        var due: [(key: Key, serial: UInt64)] = []
        while let first = entries.first, first.deadline <= now {
            entries.removeFirst()
            due.append((first.key, first.serial))
        }
        return due
    }
}

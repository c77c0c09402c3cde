import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import NameBasedSockets

private let ms: UInt64 = 1_000_000

/// The event loop's own lag is not a path's silence. At 10,000 UDP sessions on one loop, a loop
/// blocked for a second made every subflow with a probe in flight look stalled (its acknowledgement
/// sat unread in the socket), and the retirements and rejoins that followed blocked it longer.
@Suite("Loop lag (pure)")
struct LoopLagTests {
    @Test("lateness under the threshold is noise; overlapping reports merge into one interval")
    func recordsAndMerges() {
        var lag = LoopLag()
        lag.record(due: 1_000 * ms, ran: 1_005 * ms)
        #expect(lag.intervals.isEmpty)
        // A blocked second: every timer due in it reports when it finally ran.
        lag.record(due: 2_000 * ms, ran: 3_000 * ms)
        lag.record(due: 2_500 * ms, ran: 3_001 * ms)
        lag.record(due: 2_950 * ms, ran: 3_002 * ms)
        #expect(lag.intervals.count == 1)
        #expect(lag.intervals.first?.start == 2_000 * ms && lag.intervals.first?.end == 3_002 * ms)
        lag.record(due: 5_000 * ms, ran: 5_100 * ms)
        #expect(lag.intervals.count == 2)
        // A timer due before both that ran after them covers both.
        lag.record(due: 1_500 * ms, ran: 5_200 * ms)
        #expect(lag.intervals.count == 1)
        #expect(lag.blocked(from: 0, to: 10_000 * ms) == 3_700 * ms)
    }

    @Test("only the blocked time inside the silence is discounted")
    func discountsInsideTheWindow() {
        var lag = LoopLag()
        lag.record(due: 10_000 * ms, ran: 11_000 * ms)  // blocked 10.0 s to 11.0 s
        // Silent 1,100 ms at 11.05 s: 1,000 of them the loop's.
        #expect(lag.discounted(silentMs: 1_100, now: 11_050 * ms) == 100)
        // Silent 300 ms at 11.2 s: the window starts at 10.9 s, 100 ms of it blocked.
        #expect(lag.discounted(silentMs: 300, now: 11_200 * ms) == 200)
        // A block before the silence began does not shorten it.
        #expect(lag.discounted(silentMs: 500, now: 12_000 * ms) == 500)
        #expect(LoopLag().discounted(silentMs: 800, now: 12_000 * ms) == 800)
    }

    @Test("lag explains away at most LoopLag.maximumDiscount: a loop behind for a minute still finds a dead path")
    func discountIsBounded() {
        var lag = LoopLag()
        // Timers 30 ms late one after another for a minute: one interval, 0 to 60 s.
        for due in stride(from: UInt64(0), to: 60_000 * ms, by: Int(20 * ms)) { lag.record(due: due, ran: due + 30 * ms) }
        #expect(lag.intervals.count == 1)
        let cap = Int64(LoopLag.maximumDiscount / ms)
        #expect(lag.discounted(silentMs: 60_000, now: 60_010 * ms) == 60_000 - cap)
        #expect(lag.discounted(silentMs: 5_000, now: 60_010 * ms) == 0, "within the cap, as before")
        let probe = SubflowProgress(inFlight: true, silentMs: 60_000, rttMs: 1, timeoutRetransmissions: 1, bytesPerSecond: 0)
        #expect(probe.looksStalled(limitMs: 200, lag: lag, now: 60_010 * ms))
        #expect(!SubflowProgress(inFlight: true, silentMs: cap, rttMs: 1, timeoutRetransmissions: 1, bytesPerSecond: 0)
            .looksStalled(limitMs: 200, lag: lag, now: 60_010 * ms))
    }

    @Test("a probe in flight through a blocked loop is not a stall; the same silence without the block is")
    func stallRuleDiscountsLag() {
        let progress = SubflowProgress(inFlight: true, silentMs: 1_050, rttMs: 1, timeoutRetransmissions: 1, bytesPerSecond: 0)
        var lag = LoopLag()
        lag.record(due: 10_000 * ms, ran: 11_000 * ms)
        #expect(!progress.looksStalled(limitMs: 200, lag: lag, now: 11_010 * ms))
        #expect(progress.looksStalled(limitMs: 200, lag: LoopLag(), now: 11_010 * ms))
        // Silent long after the block: a real stall.
        #expect(progress.looksStalled(limitMs: 200, lag: lag, now: 13_000 * ms))
        // Nothing in flight, or no timeout yet: never.
        var idle = progress
        idle.inFlight = false
        #expect(!idle.looksStalled(limitMs: 200, lag: LoopLag(), now: 11_010 * ms))
        idle = progress
        idle.timeoutRetransmissions = 0
        #expect(!idle.looksStalled(limitMs: 200, lag: LoopLag(), now: 11_010 * ms))
    }

    @Test("a TCP subflow silent, or repairing a loss, for a round trip and 40 ms with data in flight holds the peer's head of line; a UDP one, an idle one or a shorter time do not")
    func headOfLineOverdue() {
        let busy = SubflowProgress(inFlight: true, silentMs: 45, rttMs: 20, timeoutRetransmissions: 0, bytesPerSecond: 0, silenceClockedByKernel: true)
        #expect(busy.headOfLineOverdue(recoveringMs: nil))
        var shorter = busy
        shorter.silentMs = 30
        #expect(!shorter.headOfLineOverdue(recoveringMs: nil))
        var longPath = busy
        longPath.rttMsPrecise = 60   // a round trip longer than the silence: an answer may be on its way
        #expect(!longPath.headOfLineOverdue(recoveringMs: nil))
        longPath.silentMs = 61
        #expect(longPath.headOfLineOverdue(recoveringMs: nil))
        var idle = busy
        idle.inFlight = false
        #expect(!idle.headOfLineOverdue(recoveringMs: nil))
        var udp = busy
        udp.silenceClockedByKernel = false
        #expect(!udp.headOfLineOverdue(recoveringMs: nil))
        // SACKs keep coming (no silence), but the repair has taken longer than a fast retransmission.
        var repairing = busy
        repairing.silentMs = 2
        repairing.lossRecovery = true
        #expect(!repairing.headOfLineOverdue(recoveringMs: nil), "just seen repairing")
        #expect(!repairing.headOfLineOverdue(recoveringMs: 39))
        #expect(repairing.headOfLineOverdue(recoveringMs: 40))
        repairing.rttMsPrecise = 60
        #expect(!repairing.headOfLineOverdue(recoveringMs: 50), "within a round trip of a long path")
        #expect(repairing.headOfLineOverdue(recoveringMs: 60))
        var repaired = repairing
        repaired.lossRecovery = false
        #expect(!repaired.headOfLineOverdue(recoveringMs: 60), "the engine's clock is stale once TCP is out of recovery")
    }

    @Test("a socket is behind from the first wake-up that read its limit to the first that did not")
    func readBacklog() {
        var backlog = ReadBacklog()
        #expect(backlog.wakeupEnded(reads: 10, limit: 256, now: 1_000 * ms) == nil)
        #expect(backlog.wakeupEnded(reads: 256, limit: 256, now: 1_100 * ms)! == (1_100 * ms, 1_100 * ms))
        #expect(backlog.wakeupEnded(reads: 256, limit: 256, now: 1_400 * ms)! == (1_100 * ms, 1_400 * ms))
        #expect(backlog.wakeupEnded(reads: 3, limit: 256, now: 1_500 * ms)! == (1_100 * ms, 1_500 * ms))
        #expect(backlog.wakeupEnded(reads: 3, limit: 256, now: 1_600 * ms) == nil)
        // Reported as they come, the intervals make one blocked stretch in the loop's record.
        var lag = LoopLag()
        var again = ReadBacklog()
        for (reads, at) in [(256, 2_000), (256, 2_300), (256, 2_700), (40, 2_750)] {
            if let behind = again.wakeupEnded(reads: reads, limit: 256, now: UInt64(at) * ms) { lag.record(due: behind.start, ran: behind.end) }
        }
        #expect(lag.intervals.count == 1)
        #expect(lag.blocked(from: 0, to: 5_000 * ms) == 750 * ms)
    }

    @Test("a subflow on a listener's socket discounts the loop's lag and that socket's backlog, merged where they overlap")
    func mergesLoopAndSocket() {
        var loop = LoopLag()
        loop.record(due: 1_000 * ms, ran: 1_200 * ms)
        loop.record(due: 3_000 * ms, ran: 3_100 * ms)
        var socket = LoopLag()
        socket.record(due: 1_100 * ms, ran: 1_500 * ms)  // overlaps the loop's first
        socket.record(due: 2_000 * ms, ran: 2_050 * ms)
        let both = loop.merging(socket)
        #expect(both.intervals.map { [$0.start / ms, $0.end / ms] } == [[1_000, 1_500], [2_000, 2_050], [3_000, 3_100]])
        #expect(both.blocked(from: 0, to: 5_000 * ms) == 650 * ms)
        #expect(socket.merging(loop).intervals.map { [$0.start, $0.end] } == both.intervals.map { [$0.start, $0.end] })
        #expect(loop.merging(LoopLag()).intervals.count == 2 && LoopLag().merging(socket).intervals.count == 2)
        // The same silence: a stall on a socket of its own, none where that socket was behind.
        let progress = SubflowProgress(inFlight: true, silentMs: 600, rttMs: 1, timeoutRetransmissions: 1, bytesPerSecond: 0)
        #expect(progress.looksStalled(limitMs: 200, lag: loop, now: 1_600 * ms))
        #expect(!progress.looksStalled(limitMs: 200, lag: both, now: 1_600 * ms))
    }

    @Test("TCP's silence is the kernel's: no loop lag comes off it; a UDP subflow's loses its loop's lag and its socket's backlog")
    func kernelClockedSilence() {
        var blocked = LoopLag()
        blocked.record(due: 10_000 * ms, ran: 11_000 * ms)
        var info = tcp_info()
        info.tcpi_rtt = 1_000  // µs
        info.tcpi_unacked = 3
        info.tcpi_retransmits = 1
        info.tcpi_last_ack_recv = 1_050  // ms
        let tcp = SubflowProgress(info)
        #expect(tcp.silenceClockedByKernel)
        #expect(tcp.looksStalled(limitMs: 200, lag: tcp.lagToDiscount(loop: blocked, socketBacklog: blocked), now: 11_010 * ms))
        let udp = SubflowProgress(inFlight: true, silentMs: 1_050, rttMs: 1, timeoutRetransmissions: 1, bytesPerSecond: 0)
        #expect(!udp.silenceClockedByKernel)
        #expect(!udp.looksStalled(limitMs: 200, lag: udp.lagToDiscount(loop: blocked, socketBacklog: nil), now: 11_010 * ms))
        #expect(!udp.looksStalled(limitMs: 200, lag: udp.lagToDiscount(loop: LoopLag(), socketBacklog: blocked), now: 11_010 * ms))
        #expect(udp.looksStalled(limitMs: 200, lag: udp.lagToDiscount(loop: LoopLag(), socketBacklog: LoopLag()), now: 11_010 * ms))
    }

    @Test("the record keeps a bounded number of intervals")
    func bounded() {
        var lag = LoopLag()
        for i in 0 ..< UInt64(100) { lag.record(due: i * 1_000 * ms, ran: i * 1_000 * ms + 50 * ms) }
        #expect(lag.intervals.count == LoopLag.capacity)
    }
}

@Suite("Handshake deadlines (pure)")
struct DeadlineQueueTests {
    @Test("expired entries come out in order; a reused key keeps its new entry")
    func expiresInOrderWithSerials() {
        var queue = DeadlineQueue<Int>()
        let t0 = NIODeadline.uptimeNanoseconds(1_000 * ms)
        queue.add(7, serial: 1, deadline: t0 + .seconds(5))
        queue.add(8, serial: 2, deadline: t0 + .seconds(6))
        queue.add(7, serial: 3, deadline: t0 + .seconds(7))  // key 7 again, a new entry
        queue.add(9, serial: 4, deadline: t0 + .milliseconds(5_500))  // out of order: inserted in place
        #expect(queue.next == t0 + .seconds(5))
        #expect(queue.popExpired(now: t0 + .seconds(4)).isEmpty)
        let due = queue.popExpired(now: t0 + .seconds(6))
        #expect(due.map(\.key) == [7, 9, 8])
        #expect(due.map(\.serial) == [1, 4, 2])
        // The owner compares serials: the entry now under key 7 has serial 3, so serial 1 expires nothing.
        #expect(queue.count == 1 && queue.next == t0 + .seconds(7))
    }
}

@Suite("LoopTimer", .timeLimit(.minutes(1)))
struct LoopTimerTests {
    final class Owner: @unchecked Sendable {
        let fired = Mutex<[UInt64]>([])
    }

    private func onLoop<T: Sendable>(_ loop: any EventLoop, _ body: @escaping @Sendable () -> T) async throws -> T {
        try await loop.submit(body).get()
    }

    /// A timer whose action records when it ran in `owner.fired`.
    private func recordingTimer(on loop: any EventLoop, owner: Owner) async throws -> NIOLoopBound<LoopTimer> {
        try await onLoop(loop) {
            NIOLoopBound(LoopTimer(on: loop, owner: owner) { $0.fired.withLock { $0.append(NIODeadline.now().uptimeNanoseconds) } }, eventLoop: loop)
        }
    }

    /// The timers of a loop share its `TimerQueue` (one NIO task at the earliest deadline): they
    /// fire in deadline order, each once, an action may arm timers again, and a timer whose owner
    /// is gone does nothing; afterwards the queue holds nothing.
    @Test("timers on one loop share its queue: deadline order, once each, nothing left behind")
    func sharedQueue() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let order = Mutex<[Int]>([])
        let owners = (0..<50).map { _ in Owner() }
        try await onLoop(loop) {
            // 7 and 50 are coprime: 50 distinct deadlines, 10 to 59 ms, armed out of order. From one
            // instant: a thread preempted while arming (a busy 2-core machine) would otherwise
            // shift the later ones.
            let base = NIODeadline.now()
            for (i, owner) in owners.enumerated() {
                LoopTimer(on: loop, owner: owner) { _ in order.withLock { $0.append(i) } }.arm(at: base + .milliseconds(Int64(10 + (i * 7) % 50)))
            }
            // Armed from another timer's action, for after all of them.
            let later = LoopTimer(on: loop, owner: owners[0]) { _ in order.withLock { $0.append(100) } }
            LoopTimer(on: loop, owner: owners[0]) { _ in later.arm(in: .milliseconds(70)) }.arm(in: .milliseconds(5))
            // Its owner goes before the deadline: nothing runs.
            var orphan: Owner? = Owner()
            LoopTimer(on: loop, owner: orphan!) { _ in order.withLock { $0.append(-1) } }.arm(in: .milliseconds(30))
            orphan = nil
        }
        try await Task.sleep(for: .milliseconds(300))
        let expected = (0..<50).sorted { (10 + ($0 * 7) % 50) < (10 + ($1 * 7) % 50) } + [100]
        #expect(order.withLock { $0 } == expected)
        #expect(try await onLoop(loop) { TimerQueue.on(loop).countForTesting } == 0)
        withExtendedLifetime(owners) {}
        try await group.shutdownGracefully()
    }

    @Test("timers armed with a slack come due at its next multiple, together, never early")
    func slackGathers() async throws {
        let slack = TimeAmount.milliseconds(100)
        #expect(LoopTimer.coalesced(.uptimeNanoseconds(1_000 * ms), slack: slack).uptimeNanoseconds == 1_000 * ms)
        #expect(LoopTimer.coalesced(.uptimeNanoseconds(1_000 * ms + 1), slack: slack).uptimeNanoseconds == 1_100 * ms)
        #expect(LoopTimer.coalesced(.uptimeNanoseconds(1_099 * ms), slack: slack).uptimeNanoseconds == 1_100 * ms)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let owner = Owner()
        let armed = try await onLoop(loop) { () -> (UInt64, [UInt64]) in
            let start = NIODeadline.now().uptimeNanoseconds
            let deadlines = (0..<20).map { i -> UInt64 in
                let timer = LoopTimer(on: loop, owner: owner) { $0.fired.withLock { $0.append(NIODeadline.now().uptimeNanoseconds) } }
                timer.arm(in: .milliseconds(Int64(200 + i)), slack: slack)
                return timer.deadline!.uptimeNanoseconds
            }
            return (start, deadlines)
        }
        let (start, deadlines) = armed
        #expect(deadlines.allSatisfy { $0 % (100 * ms) == 0 && $0 >= start + 200 * ms && $0 < start + 319 * ms })
        // 20 delays a millisecond apart span at most two multiples of the slack.
        #expect(Set(deadlines).count <= 2)
        try await Task.sleep(for: .milliseconds(600))
        let fired = owner.fired.withLock { $0 }
        #expect(fired.count == 20)
        #expect(zip(fired.sorted(), deadlines.sorted()).allSatisfy { $0 >= $1 })
        try await group.shutdownGracefully()
    }

    @Test("stopping prevents the action; re-arming later fires once, at the later deadline")
    func stopAndRearm() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let owner = Owner()
        let timer = try await recordingTimer(on: loop, owner: owner)
        let start = NIODeadline.now().uptimeNanoseconds
        try await onLoop(loop) {
            timer.value.arm(in: .milliseconds(30))
            timer.value.stop()
        }
        try await Task.sleep(for: .milliseconds(80))
        #expect(owner.fired.withLock { $0.isEmpty }, "stopped")
        let tasks = try await onLoop(loop) {
            timer.value.arm(in: .milliseconds(20))
            timer.value.arm(in: .milliseconds(60))  // later: no second task, the first re-arms
            return timer.value.scheduledCountForTesting
        }
        #expect(tasks == 1)
        // Due 60 ms from now; a loop shared with the whole suite may run it late, not twice.
        try await waitFor("the re-armed timer fired") { !owner.fired.withLock { $0.isEmpty } }
        try await Task.sleep(for: .milliseconds(100))
        let fired = owner.fired.withLock { $0 }
        #expect(fired.count == 1)
        if let first = fired.first { #expect(first - start >= 80 * ms + 60 * ms) }
        let (armed, pending) = try await onLoop(loop) { (timer.value.isArmed, timer.value.scheduledCountForTesting) }
        #expect(!armed && pending == 0)
    }

    @Test("moving the deadline earlier fires at the earlier one, once")
    func earlier() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let owner = Owner()
        let timer = try await recordingTimer(on: loop, owner: owner)
        let start = NIODeadline.now().uptimeNanoseconds
        try await onLoop(loop) {
            timer.value.arm(in: .seconds(10))
            timer.value.arm(in: .milliseconds(20))
        }
        // Polled rather than slept for: inside the parallel suite the shared loop can be busy for
        // seconds (it once ran this 120 ms sleep's check before the timer had fired).
        try await waitFor("the timer fired", seconds: 5) { owner.fired.withLock { !$0.isEmpty } }
        try await Task.sleep(for: .milliseconds(50))
        let fired = owner.fired.withLock { $0 }
        #expect(fired.count == 1)
        if let first = fired.first { #expect(first - start < 5_000 * ms, "at the earlier deadline, not the later one (10 s)") }
    }

    @Test("a blocked loop shows up in its LoopLag")
    func recordsLag() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let owner = Owner()
        let timer = try await onLoop(loop) {
            NIOLoopBound(LoopTimer(on: loop, owner: owner) { _ in }, eventLoop: loop)
        }
        try await onLoop(loop) {
            timer.value.arm(in: .milliseconds(10))
            usleep(150_000)  // the loop blocked past the deadline
        }
        try await Task.sleep(for: .milliseconds(50))
        let blocked = try await onLoop(loop) {
            let now = NIODeadline.now().uptimeNanoseconds
            return LoopLag.current.blocked(from: now - 1_000 * ms, to: now)
        }
        #expect(blocked >= 100 * ms)
    }
    /// The close storm's listener in small: a loop that reads its shared socket more slowly than
    /// datagrams arrive is behind, though no timer of it ran late. That is the socket's record, for
    /// the subflows it carries, not the loop's: with it in the loop's, another listener's bulk
    /// transfer hid a silent peer from a subflow on the same loop for over 10 s. An opener's socket,
    /// one subflow's, keeps none. Its own loop (a thread of its own), so that no other test's timer on
    /// the shared loops can put lag in its record.
    @Test("a listener's socket whose reads keep finding more waiting records it as its own backlog, not its loop's lag; an opener's records nothing",
          arguments: [true, false])
    func slowReaderRecordsLag(sharedByListener: Bool) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            try await readSlowly(on: group, sharedByListener: sharedByListener)
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
        try await group.shutdownGracefully()
    }

    private func readSlowly(on group: MultiThreadedEventLoopGroup, sharedByListener: Bool) async throws {
        let loop = group.next()
        let receiver = try await DatagramSubflow.openSocket(on: loop, bind: try SocketAddress(ipAddress: "127.0.0.1", port: 0),
                                                            connect: nil, reuseAddress: false, sharedByListener: sharedByListener).get()
        let read = Atomic(0)
        try await loop.submit {
            // 0.3 ms of work per datagram: 1,000 of them take the loop 300 ms, in 4 wake-ups of 256 or fewer.
            try receiver.pipeline.syncOperations.handler(type: DatagramInbound.self).onDatagram = { _ in
                usleep(300)
                read.add(1, ordering: .relaxed)
            }
        }.get()
        let sender = try await DatagramBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let destination = try #require(receiver.localAddress)
        for _ in 0 ..< 1000 {
            sender.write(AddressedEnvelope(remoteAddress: destination, data: ByteBuffer(bytes: [1, 2, 3])), promise: nil)
        }
        sender.flush()
        try await waitFor("every datagram read") { read.load(ordering: .relaxed) == 1000 }
        let (loopBlocked, socketBehind) = try await loop.submit {
            let now = NIODeadline.now().uptimeNanoseconds
            let backlog = try receiver.pipeline.syncOperations.handler(type: DatagramInbound.self).backlogLag
            return (LoopLag.current.blocked(from: now - 5_000 * ms, to: now), backlog?.blocked(from: now - 5_000 * ms, to: now))
        }.get()
        #expect(loopBlocked == 0, "\(loopBlocked / ms) ms")
        if sharedByListener {
            // Behind from the end of the first wake-up (about 77 ms in) to the last (about 300 ms).
            let behind = try #require(socketBehind)
            #expect(behind >= 100 * ms, "\(behind / ms) ms")
        } else {
            #expect(socketBehind == nil)
        }
        try await sender.close()
        try await receiver.close()
    }
}

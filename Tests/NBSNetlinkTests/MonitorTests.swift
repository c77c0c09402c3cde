import Testing
import Synchronization
@testable import NBSNetlink
#if canImport(Glibc)
import Glibc
#endif

/// Collects up to `count` events from a stream, or fewer if it finishes.
private func collect(_ stream: AsyncStream<InterfaceEvent>, count: Int) async -> [InterfaceEvent] {
    var events: [InterfaceEvent] = []
    guard count > 0 else { return events }
    for await event in stream {
        events.append(event)
        if events.count == count { break }
    }
    return events
}

@Suite struct ScriptedInterfaceMonitorTests {
    @Test func subscribersGetTheStateThenTheChanges() async throws {
        let monitor = ScriptedInterfaceMonitor(interfaces: [Sample.link(2, "eth0")], addresses: [Sample.v4("192.0.2.1")])
        try monitor.start()
        let stream = monitor.events
        monitor.addAddress(Sample.v6("2001:db8::1", flags: Sample.tentative))
        monitor.addAddress(Sample.v6("2001:db8::1"))
        monitor.setInterface(Sample.link(2, "eth0", up: false))
        let events = await collect(stream, count: 6)
        #expect(events.map(\.brief) == [
            "interfaceUp eth0", "addressAdded 192.0.2.1",  // replay
            "addressAdded 2001:db8::1",
            "interfaceDown eth0", "addressRemoved 192.0.2.1", "addressRemoved 2001:db8::1",
        ])
        #expect(monitor.usableAddresses.isEmpty)
        #expect(monitor.interfaces.map(\.isUp) == [false])
    }

    @Test func stopFinishesEveryStream() async {
        let monitor = ScriptedInterfaceMonitor()
        let first = monitor.events
        let second = monitor.events
        monitor.stop()
        #expect(await collect(first, count: 10).isEmpty)
        #expect(await collect(second, count: 10).isEmpty)
        #expect(await collect(monitor.events, count: 10).isEmpty, "subscribing after stop yields a finished stream")
        monitor.stop()
    }

    @Test func onEventDeliversInOrderUntilCancelled() async throws {
        let monitor = ScriptedInterfaceMonitor(interfaces: [Sample.link(2, "eth0")])
        let seen = Mutex<[String]>([])
        let subscription = monitor.onEvent { event in seen.withLock { $0.append(event.brief) } }
        monitor.addAddress(Sample.v4("192.0.2.1"))
        monitor.removeAddress(Sample.v4("192.0.2.1"))
        try await waitUntil { seen.withLock { $0.count } == 3 }
        #expect(seen.withLock { $0 } == ["interfaceUp eth0", "addressAdded 192.0.2.1", "addressRemoved 192.0.2.1"])
        subscription.cancel()
        try await Task.sleep(for: .milliseconds(50))
        monitor.addAddress(Sample.v4("192.0.2.2"))
        try await Task.sleep(for: .milliseconds(100))
        #expect(seen.withLock { $0.count } == 3)
    }

    @Test func usableThroughTheProtocol() async {
        let monitor: any InterfaceMonitor = ScriptedInterfaceMonitor(
            interfaces: [Sample.link(2, "eth0")], addresses: [Sample.v4("192.0.2.1"), Sample.v6("fe80::1", scope: 253)])
        #expect(monitor.usableAddresses.map(\.address) == ["192.0.2.1"])
        #expect(monitor.snapshot.addresses.count == 2)
        monitor.stop()
    }
}

/// The real monitor in the test process's own namespace. Needs no privileges; it only reads.
@Suite struct NetlinkInterfaceMonitorTests {
    @Test func dumpsTheCurrentNamespaceAndStopsPromptly() async throws {
        let monitor = try NetlinkInterfaceMonitor()
        let early = monitor.events
        try monitor.start()
        let snapshot = monitor.snapshot
        let loopback = try #require(snapshot.interfaces.first { $0.isLoopback }, "every namespace has lo")
        #expect(loopback.name == "lo")
        #expect(snapshot.addresses.allSatisfy { !$0.address.isEmpty })

        // A subscriber from before start() saw the dump as events; one from after gets the same
        // state replayed.
        let expected = snapshot.currentStateEvents
        #expect(await collect(early, count: expected.count) == expected)
        let late = monitor.events
        #expect(await collect(late, count: expected.count) == expected)

        let started = ContinuousClock.now
        monitor.stop()
        #expect(ContinuousClock.now - started < .seconds(2), "stop wakes the reader instead of waiting for traffic")
        #expect(await collect(late, count: 1).isEmpty, "stop finishes the streams")
        #expect(await collect(early, count: 1).isEmpty)
        monitor.stop()
    }

    @Test func lifecycleMisuseIsReported() throws {
        let monitor = try NetlinkInterfaceMonitor()
        try monitor.start()
        #expect(throws: NetlinkMonitorError.alreadyStarted) { try monitor.start() }
        monitor.stop()
        #expect(throws: NetlinkMonitorError.stopped) { try monitor.start() }

        let neverStarted = try NetlinkInterfaceMonitor()
        neverStarted.stop()
        #expect(throws: NetlinkMonitorError.stopped) { try neverStarted.start() }
    }

    @Test func manyMonitorsOpenAndCloseWithoutLeakingDescriptors() throws {
        let before = openDescriptorCount()
        for _ in 0..<20 {
            let monitor = try NetlinkInterfaceMonitor(receiveBufferSize: 0)
            try monitor.start()
            monitor.stop()
        }
        for _ in 0..<5 { _ = try NetlinkInterfaceMonitor() }  // released without start or stop
        for _ in 0..<5 { try NetlinkInterfaceMonitor().start() }  // released while running: deinit stops it
        // A leak would show as 50 more; the slack absorbs monitors of tests running in parallel.
        #expect(openDescriptorCount() < before + 10)
    }
}

extension NetlinkInterfaceMonitorTests {
    /// stop() may land while start() is still dumping on another thread; either start() wins and
    /// stop() then stops it, or start() throws `.stopped`. Nothing hangs or double-closes.
    @Test func stopRacingStartIsSafe() async throws {
        for _ in 0..<30 {
            let monitor = try NetlinkInterfaceMonitor()
            let starter = Task.detached { () -> Bool in
                do {
                    try monitor.start()
                    return true
                } catch {
                    #expect(error as? NetlinkMonitorError == .stopped)
                    return false
                }
            }
            monitor.stop()
            _ = await starter.value
            monitor.stop()
            #expect(await collect(monitor.events, count: 1).isEmpty)
        }
    }
}

func openDescriptorCount() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return 0 }
    defer { closedir(dir) }
    var count = 0
    while readdir(dir) != nil { count += 1 }
    return count
}

func waitUntil(timeout: Duration = .seconds(10), _ condition: @Sendable () -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        if ContinuousClock.now > deadline {
            Issue.record("condition not met within \(timeout)")
            return
        }
        try await Task.sleep(for: .milliseconds(20))
    }
}

import NBSProtocol
import NBSNetlink
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import NameBasedSockets

private func address(_ ip: String) -> SocketAddress { try! SocketAddress(ipAddress: ip, port: 0) }
private func peer(_ ip: String) -> SocketAddress { try! SocketAddress(ipAddress: ip, port: 7000) }

@Suite("Path planner (pure)")
struct PathPlannerTests {
    let locals = [address("192.0.2.1"), address("198.51.100.1"), address("2001:db8:1::1")]
    let peers = [peer("198.51.100.2"), peer("192.0.2.2"), peer("2001:db8:1::2")]

    @Test("the full mesh is every same-family pair")
    func fullMesh() {
        let joins = PathPlanner.joins(locals: locals, peers: peers, inUse: [], liveCount: 0, maxSubflows: 16, policy: .aggregate, hasRegularSubflow: false)
        #expect(joins.count == 5)  // 2 × 2 IPv4 + 1 × 1 IPv6
        #expect(joins.allSatisfy { $0.local.sameFamily($0.remote) })
        #expect(joins.allSatisfy { !$0.backup })
    }

    @Test("under a limit every address is covered before any is doubled, same-prefix pairs first")
    func spreadsUnderLimit() {
        let joins = PathPlanner.joins(locals: locals, peers: peers, inUse: [], liveCount: 0, maxSubflows: 3, policy: .aggregate, hasRegularSubflow: false)
        let pairs = Set(joins.map { "\($0.local.ipAddress!)>\($0.remote.ipAddress!)" })
        #expect(pairs == ["192.0.2.1>192.0.2.2", "198.51.100.1>198.51.100.2", "2001:db8:1::1>2001:db8:1::2"])
    }

    @Test("an open tries every local and every remote address, the peer's in the resolver's order, each from its closest local address")
    func openAttempts() {
        func attempts(_ locals: [String], _ remotes: [String]) -> [String] {
            PathPlanner.openAttempts(locals: locals.map(address), remotes: remotes.map(peer)).map { "\($0.local.ipAddress!)>\($0.remote.ipAddress!)" }
        }
        // The namespaces' hosts: each remote from its own path first; a dead path 1 no longer fails
        // every attempt (each remote used to be tried from the first local address only).
        #expect(attempts(["2001:db8:1::1", "2001:db8:2::1", "192.0.2.1", "198.51.100.1"], ["2001:db8:1::2", "2001:db8:2::2", "192.0.2.2", "198.51.100.2"])
            == ["2001:db8:1::1>2001:db8:1::2", "2001:db8:2::1>2001:db8:2::2", "192.0.2.1>192.0.2.2", "198.51.100.1>198.51.100.2"])
        // One address for the peer, two interfaces here (Wi-Fi and LTE): both are tried.
        #expect(attempts(["192.0.2.1", "198.51.100.1"], ["203.0.113.7"]) == ["192.0.2.1>203.0.113.7", "198.51.100.1>203.0.113.7"])
        // One interface, two peer addresses: both, in the resolver's order when no prefix decides.
        #expect(attempts(["192.0.2.1"], ["203.0.113.7", "203.0.113.9"]) == ["192.0.2.1>203.0.113.7", "192.0.2.1>203.0.113.9"])
        #expect(attempts(["192.0.2.1"], ["2001:db8::7"]).isEmpty)
        // The resolver's order stands even where a later address shares a longer prefix.
        #expect(attempts(["127.0.0.1"], ["127.0.0.2", "127.0.0.1"]) == ["127.0.0.1>127.0.0.2", "127.0.0.1>127.0.0.1"])
        #expect(attempts(["192.0.2.1", "198.51.100.1"], ["198.51.100.2", "192.0.2.2"]) == ["198.51.100.1>198.51.100.2", "192.0.2.1>192.0.2.2"])
    }

    @Test("pairs in use or connecting are not opened again, and the limit counts them")
    func respectsInUse() {
        let inUse: Set<PathPlanner.Pair> = [.init(local: "192.0.2.1", remote: "192.0.2.2")]
        let joins = PathPlanner.joins(locals: locals, peers: peers, inUse: inUse, liveCount: 1, maxSubflows: 2, policy: .aggregate, hasRegularSubflow: true)
        #expect(joins.count == 1)
        #expect(!joins.contains { $0.local.ipAddress == "192.0.2.1" && $0.remote.ipAddress == "192.0.2.2" })
    }

    @Test("handover: new subflows are backups once a regular one exists")
    func handoverBackups() {
        let fresh = PathPlanner.joins(locals: locals, peers: peers, inUse: [], liveCount: 0, maxSubflows: 3, policy: .handover, hasRegularSubflow: false)
        #expect(fresh.map { $0.backup } == [false, true, true])
        let later = PathPlanner.joins(locals: locals, peers: peers, inUse: [], liveCount: 1, maxSubflows: 3, policy: .handover, hasRegularSubflow: true)
        #expect(later.allSatisfy { $0.backup })
    }

    @Test("loopback addresses pair only with loopback peers")
    func loopbackPairing() {
        let joins = PathPlanner.joins(locals: [address("127.0.0.1"), address("192.0.2.1")], peers: [peer("127.0.0.1"), peer("192.0.2.2")],
                                      inUse: [], liveCount: 0, maxSubflows: 8, policy: .aggregate, hasRegularSubflow: false)
        #expect(joins.count == 2)
        #expect(joins.allSatisfy { $0.local.isLoopbackAddress == $0.remote.isLoopbackAddress })
    }

    @Test("an address or interface going away names exactly the subflows on it")
    func affectedSubflows() {
        let subflows: [(id: UInt32, local: String, interface: String?)] = [(0, "192.0.2.1", "eth0"), (1, "198.51.100.1", "wlan0"), (2, "192.0.2.1", "eth0")]
        let removed = PathPlanner.affected(by: .addressRemoved(.init(interfaceIndex: 2, interfaceName: "eth0", family: .inet, address: "192.0.2.1", prefixLength: 24)), subflows: subflows)
        #expect(removed.ids.sorted() == [0, 2])
        #expect(removed.removedAddress == "192.0.2.1")
        let down = PathPlanner.affected(by: .interfaceDown(.init(index: 3, name: "wlan0", isUp: false)), subflows: subflows)
        #expect(down.ids == [1])
        let added = PathPlanner.affected(by: .addressAdded(.init(interfaceIndex: 3, interfaceName: "wlan0", family: .inet, address: "203.0.113.7", prefixLength: 24)), subflows: subflows)
        #expect(added.ids.isEmpty)
    }

    @Test("an address storm never plans more than the limit")
    func stormBounded() {
        let many = (1...250).map { address("203.0.113.\($0)") }
        let joins = PathPlanner.joins(locals: many, peers: [peer("203.0.113.254"), peer("198.51.100.2")], inUse: [], liveCount: 3,
                                      maxSubflows: 8, policy: .aggregate, hasRegularSubflow: true)
        #expect(joins.count == 5)
    }
}

/// An interface monitor a test drives event by event: the injectable edge of the path manager.
final class TestInterfaceMonitor: InterfaceMonitor {
    private let state: Mutex<(table: InterfaceTable, continuations: [Int: AsyncStream<InterfaceEvent>.Continuation], next: Int)>

    init(addresses: [String]) {
        var table = InterfaceTable()
        _ = table.apply(.newLink(.init(index: 1, name: "lo", isUp: true, isLoopback: true)))
        for ip in addresses {
            _ = table.apply(.newAddress(.init(interfaceIndex: 1, interfaceName: "lo", family: ip.contains(":") ? .inet6 : .inet, address: ip, prefixLength: 8, scope: 0)))
        }
        state = Mutex((table, [:], 0))
    }

    func start() throws {}
    var snapshot: InterfaceTable { state.withLock { $0.table } }
    var events: AsyncStream<InterfaceEvent> {
        let (stream, continuation) = AsyncStream.makeStream(of: InterfaceEvent.self)
        let id = state.withLock { state in
            state.next += 1
            state.continuations[state.next] = continuation
            return state.next
        }
        continuation.onTermination = { [weak self] _ in self?.state.withLock { _ = $0.continuations.removeValue(forKey: id) } }
        return stream
    }
    func stop() { state.withLock { for c in $0.continuations.values { c.finish() } } }

    /// Streams handed out and not yet ended.
    var subscriberCount: Int { state.withLock { $0.continuations.count } }

    func send(_ event: InterfaceEvent) {
        state.withLock { for c in $0.continuations.values { c.yield(event) } }
    }

    static func loopback(_ ip: String) -> InterfaceAddress {
        .init(interfaceIndex: 1, interfaceName: "lo", family: .inet, address: ip, prefixLength: 8, scope: 0)
    }
}

@Suite("Path manager on loopback", .timeLimit(.minutes(2)))
struct PathManagerLoopbackTests {
    func options(_ monitor: TestInterfaceMonitor) -> NBSOptions {
        var options = NBSOptions()
        options.interfaceMonitor = monitor
        options.resolver = StaticResolver(["server.test": ["127.0.0.1"]])
        return options
    }

    @Test("an address removed: its subflow is retired at once, its data reinjected, nothing lost")
    func addressRemoved() async throws {
        let server = try await listener(options: { var o = NBSOptions(); o.interfaceMonitor = nil; return o }())
        let received = Task { () -> (Int, [UInt8]) in
            let session = try await server.accept()
            let result = try await drain(session)
            try await session.close()
            return result
        }
        let monitor = TestInterfaceMonitor(addresses: ["127.0.0.1", "127.0.0.2"])
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options(monitor))
        try await waitForSubflows(client, count: 2)
        let data = pattern(16 * 1024 * 1024, seed: 21)
        try await client.write(data.getSlice(at: 0, length: 8 * 1024 * 1024)!)
        monitor.send(.addressRemoved(TestInterfaceMonitor.loopback("127.0.0.2")))
        try await client.write(data.getSlice(at: 8 * 1024 * 1024, length: 8 * 1024 * 1024)!)
        await client.finish()
        let (count, digest) = try await withTimeout(60) { try await received.value }
        try await client.close()
        #expect(count == data.readableBytes)
        #expect(digest == sha256(data))
        let gone = await client.subflows.filter { $0.local.ipAddress == "127.0.0.2" }
        #expect(gone.count == 1)
        #expect(gone.first?.state == .closed)
        #expect(gone.first?.closeReason == "address 127.0.0.2 removed")
        await server.close()
    }

    @Test("an address added: a subflow joins from it and the peer hears ADD_ADDR")
    func addressAdded() async throws {
        let server = try await listener(options: { var o = NBSOptions(); o.interfaceMonitor = nil; return o }())
        let accepted = Task { try await server.accept() }
        let monitor = TestInterfaceMonitor(addresses: ["127.0.0.1"])
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options(monitor))
        let serverSession = try await accepted.value
        let announced = Task { () -> SocketAddress? in
            for await event in serverSession.events { if case .addressAnnounced(let a) = event { return a } }
            return nil
        }
        try await waitForSubflows(client, count: 1)
        monitor.send(.addressAdded(TestInterfaceMonitor.loopback("127.0.0.3")))
        try await waitForSubflows(client, count: 2)
        #expect(await client.subflows.contains { $0.local.ipAddress == "127.0.0.3" && $0.state.isUp })
        let heard = try await withTimeout(10) { await announced.value }
        #expect(heard?.ipAddress == "127.0.0.3")
        await client.abort()
        await serverSession.abort()
        await server.close()
    }

    @Test("the sessions on one event loop share one subscription to the monitor, each hears its events, and the last to end ends it")
    func sessionsShareTheLoopsSubscription() async throws {
        let server = try await listener(options: { var o = NBSOptions(); o.interfaceMonitor = nil; return o }())
        let monitor = TestInterfaceMonitor(addresses: ["127.0.0.1"])
        var opts = options(monitor)
        opts.eventLoopGroup = MultiThreadedEventLoopGroup.singleton.next()
        var clients: [Session] = []
        var accepted: [Session] = []
        for _ in 0..<4 {
            async let serverSide = server.accept()
            clients.append(try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: opts))
            accepted.append(try await serverSide)
        }
        #expect(monitor.subscriberCount == 1)
        monitor.send(.addressAdded(TestInterfaceMonitor.loopback("127.0.0.3")))
        for client in clients {
            try await waitForSubflows(client, count: 2)
            #expect(await client.subflows.contains { $0.local.ipAddress == "127.0.0.3" && $0.state.isUp })
        }
        for client in clients.dropLast() { await client.abort() }
        try await Task.sleep(for: .milliseconds(50))
        #expect(monitor.subscriberCount == 1)
        // Joined while the feed runs: it hears later events as the first ones did.
        async let serverSide = server.accept()
        let late = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: opts)
        accepted.append(try await serverSide)
        monitor.send(.addressAdded(TestInterfaceMonitor.loopback("127.0.0.4")))
        try await waitForSubflows(late, count: 2)
        #expect(await late.subflows.contains { $0.local.ipAddress == "127.0.0.4" && $0.state.isUp })
        #expect(monitor.subscriberCount == 1)
        await late.abort()
        await clients.last!.abort()
        let deadline = ContinuousClock.now + .seconds(5)
        while monitor.subscriberCount > 0, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(monitor.subscriberCount == 0)
        for session in accepted { await session.abort() }
        await server.close()
    }

    @Test("a member joining a running feed with an outdated view of the addresses gets the monitor's state first; one with the current view does not")
    func lateMemberWithOutdatedView() async throws {
        let monitor = TestInterfaceMonitor(addresses: ["127.0.0.1", "127.0.0.2"])
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let heard = Mutex<[String: [InterfaceEvent]]>([:])
        let current = LocalAddressBook.current(monitor: monitor)
        let outdated = LocalAddressBook(entries: Array(current.entries.prefix(1)))
        let memberships = try await loop.submit {
            let record = { (who: String) in { (event: InterfaceEvent) in heard.withLock { $0[who, default: []].append(event) } } }
            return NIOLoopBound(["first", "current", "outdated"].map { who in
                LoopInterfaceFeed.join(monitor, on: loop, knowing: who == "outdated" ? outdated : current, record(who))
            }, eventLoop: loop)
        }.get()
        #expect(monitor.subscriberCount == 1)
        let added = InterfaceEvent.addressAdded(TestInterfaceMonitor.loopback("127.0.0.3"))
        monitor.send(added)
        let deadline = ContinuousClock.now + .seconds(5)
        while heard.withLock({ $0.values.reduce(0) { $0 + $1.count } }) < 3 + monitor.snapshot.currentStateEvents.count, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        let events = heard.withLock { $0 }
        #expect(events["first"] == [added])
        #expect(events["current"] == [added])
        #expect(events["outdated"] == monitor.snapshot.currentStateEvents + [added])
        try await loop.submit { for membership in memberships.value { membership.cancel() } }.get()
        while monitor.subscriberCount > 0, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(monitor.subscriberCount == 0)
    }

    @Test("an address storm neither exceeds the subflow limit nor leaks subflows")
    func addressStorm() async throws {
        let server = try await listener(options: { var o = NBSOptions(); o.interfaceMonitor = nil; return o }())
        let received = Task { () -> Int in
            let session = try await server.accept()
            let result = try await drain(session)
            try await session.close()
            return result.bytes
        }
        let monitor = TestInterfaceMonitor(addresses: ["127.0.0.1"])
        var opts = options(monitor)
        opts.maxSubflows = 4
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: opts)
        for round in 0..<3 {
            for i in 1...100 { monitor.send(.addressAdded(TestInterfaceMonitor.loopback("127.0.\(round + 1).\(i)"))) }
            try await client.write(pattern(256 * 1024, seed: UInt64(round)))
            for i in 1...100 { monitor.send(.addressRemoved(TestInterfaceMonitor.loopback("127.0.\(round + 1).\(i)"))) }
            #expect(await client.subflows.filter { $0.state != .closed }.count <= 4)
        }
        try await Task.sleep(for: .milliseconds(300))
        let live = await client.subflows.filter { $0.state != .closed }
        #expect(live.count <= 4)
        #expect(live.allSatisfy { $0.local.ipAddress == "127.0.0.1" })
        await client.finish()
        let count = try await withTimeout(30) { try await received.value }
        #expect(count == 3 * 256 * 1024)
        try await client.close()
        await server.close()
    }
}

@Suite("Address signalling on loopback", .timeLimit(.minutes(2)))
struct AddressSignallingTests {
    @Test("the listener announces a new address and the opener joins it")
    func listenerAnnounces() async throws {
        let serverMonitor = TestInterfaceMonitor(addresses: ["127.0.0.1"])
        var serverOptions = NBSOptions()
        serverOptions.interfaceMonitor = serverMonitor
        let server = try await listener(options: serverOptions)
        let accepted = Task { try await server.accept() }
        var options = loopbackOptions()
        options.interfaceMonitor = nil
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let serverSession = try await accepted.value
        try await waitForSubflows(client, count: 1)
        serverMonitor.send(.addressAdded(TestInterfaceMonitor.loopback("127.0.0.5")))
        try await waitForSubflows(client, count: 2)
        #expect(await client.subflows.contains { $0.remote.ipAddress == "127.0.0.5" && $0.state.isUp })
        await client.abort()
        await serverSession.abort()
        await server.close()
    }

    @Test("forged ADD_ADDR and REMOVE_ADDR are dropped and counted; the session goes on")
    func forgedSignalsDropped() async throws {
        let server = try await listener(options: { var o = NBSOptions(); o.interfaceMonitor = nil; return o }())
        let received = Task { () -> (Int, [UInt8], SessionStatistics) in
            let session = try await server.accept()
            let result = try await drain(session)
            try await session.close()
            return (result.bytes, result.digest, await session.statistics)
        }
        var options = loopbackOptions()
        options.interfaceMonitor = nil
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let forged = Frame.addAddress(.init(addressID: 9, address: WireAddress(bytes: [127, 0, 0, 9], port: UInt16(server.port))!,
                                            sequence: 1, mac: [UInt8](repeating: 0xAB, count: 32)))
        await client.receiveForTesting([forged], onSubflow: 0)
        let forgedRemove = Frame.removeAddress(.init(address: WireAddress(bytes: [127, 0, 0, 1], port: 0)!, sequence: 2, mac: [UInt8](repeating: 1, count: 32)))
        await client.receiveForTesting([forgedRemove], onSubflow: 0)
        #expect(await client.statistics.rejectedSignals == 2)
        #expect(await client.subflows.filter { $0.state == .active }.count == 1)
        let data = pattern(1 << 20, seed: 4)
        try await client.write(data)
        await client.finish()
        let (count, digest, _) = try await withTimeout(20) { try await received.value }
        #expect(count == data.readableBytes)
        #expect(digest == sha256(data))
        try await client.close()
        await server.close()
    }

    @Test("a listener refuses JOINs beyond its subflow limit")
    func listenerSubflowLimit() async throws {
        var serverOptions = NBSOptions()
        serverOptions.maxSubflows = 2
        serverOptions.interfaceMonitor = nil
        let server = try await listener(options: serverOptions)
        let accepted = Task { try await server.accept() }
        var options = loopbackOptions(locals: ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"])
        options.maxSubflows = 4
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let serverSession = try await accepted.value
        try await waitForSubflows(client, count: 2)
        try await Task.sleep(for: .milliseconds(300))
        #expect(await serverSession.subflows.filter { $0.state != .closed }.count == 2)
        #expect(await client.subflows.filter { $0.state.isUp }.count == 2)
        await client.abort()
        await serverSession.abort()
        await server.close()
    }
}

@Suite("Path planner: rebalancing")
struct PathPlannerRebalanceTests {
    @Test("a local address left without a subflow at the limit replaces a doubled-up cross pair")
    func replacesCrossPair() {
        let locals = [address("192.0.2.1"), address("198.51.100.1")]
        let live: [(id: UInt32, local: SocketAddress, remote: SocketAddress)] = [
            (0, address("198.51.100.1"), peer("198.51.100.2")),
            (1, address("198.51.100.1"), peer("192.0.2.2")),
        ]
        let swap = PathPlanner.replacement(locals: locals, peers: [peer("192.0.2.2"), peer("198.51.100.2")], live: live, maxSubflows: 2)
        #expect(swap?.retire == 1)
        #expect(swap?.for.ipAddress == "192.0.2.1")
    }

    @Test("nothing is replaced below the limit, or when every local address is covered")
    func noNeedlessReplacement() {
        let locals = [address("192.0.2.1"), address("198.51.100.1")]
        let peers = [peer("192.0.2.2"), peer("198.51.100.2")]
        let covered: [(id: UInt32, local: SocketAddress, remote: SocketAddress)] = [(0, address("192.0.2.1"), peer("192.0.2.2")), (1, address("198.51.100.1"), peer("198.51.100.2"))]
        #expect(PathPlanner.replacement(locals: locals, peers: peers, live: covered, maxSubflows: 2) == nil)
        let one: [(id: UInt32, local: SocketAddress, remote: SocketAddress)] = [(0, address("198.51.100.1"), peer("198.51.100.2"))]
        #expect(PathPlanner.replacement(locals: locals, peers: peers, live: one, maxSubflows: 2) == nil)
    }
}

extension PathPlannerRebalanceTests {
    @Test("at the limit, a cross pair gives way once the same-prefix peer address is known")
    func upgradesCrossPair() {
        let live: [(id: UInt32, local: SocketAddress, remote: SocketAddress)] = [
            (4, address("192.0.2.1"), peer("198.51.100.2")),
            (3, address("198.51.100.1"), peer("198.51.100.2")),
        ]
        let peers = [peer("198.51.100.2"), peer("192.0.2.2")]
        #expect(PathPlanner.upgrade(peers: peers, live: live, maxSubflows: 2) == 4)
        #expect(PathPlanner.upgrade(peers: [peer("198.51.100.2")], live: live, maxSubflows: 2) == nil)
        #expect(PathPlanner.upgrade(peers: peers, live: live, maxSubflows: 3) == nil)
    }
}

extension PathPlannerRebalanceTests {
    @Test("a connect in progress over a cross pair is given up once the same-prefix peer address is known, unless that pair is taken")
    func outdatedConnects() {
        let cross = PathPlanner.Pair(local: "192.0.2.1", remote: "198.51.100.2")
        let cross6 = PathPlanner.Pair(local: "2001:db8:1::1", remote: "2001:db8:2::2")
        let direct = PathPlanner.Pair(local: "198.51.100.1", remote: "198.51.100.2")
        let connecting = [cross, cross6, direct]
        let known = [peer("198.51.100.2"), peer("2001:db8:2::2")]
        #expect(PathPlanner.outdated(connecting: connecting, peers: known, inUse: Set(connecting)).isEmpty)
        let announced = known + [peer("192.0.2.2"), peer("2001:db8:1::2")]
        #expect(PathPlanner.outdated(connecting: connecting, peers: announced, inUse: Set(connecting)) == [cross, cross6])
        let taken = Set(connecting + [PathPlanner.Pair(local: "192.0.2.1", remote: "192.0.2.2")])
        #expect(PathPlanner.outdated(connecting: connecting, peers: announced, inUse: taken) == [cross6])
    }
}

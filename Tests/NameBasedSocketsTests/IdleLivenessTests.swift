import Glibc
import NIOCore
import NIOPosix
import Testing

@testable import NameBasedSockets

/// The 50 ms stall checks stop on idle sessions (they cost a serve with 2,000 idle sessions 58 % of
/// a core), and whatever a session writes starts them again. Found by the soak
/// (`NBS_SOAK_SEED=290845780`): with the checks stopped and restarted only by the pump, a listener
/// that only receives never watched its subflows again, kept subflows to addresses the opener had
/// left, and refused the opener's JOINs at its subflow limit.
@Suite("Stall checks on idle sessions", .timeLimit(.minutes(2)))
struct IdleLivenessTests {
    @Test("an idle session stops its stall checks on both ends, and a write starts them again", arguments: NBSOptions.Transport.allCases)
    func idleStopsChecks(transport: NBSOptions.Transport) async throws {
        // Long enough that the checks a write starts are still running when the test looks.
        let (server, client) = try await listenerAndOpener(over: transport) { $0.livenessInterval = .milliseconds(300) }
            opener: { $0.livenessInterval = .milliseconds(300) }
        let accepted = Task { try await server.accept() }
        try await client.write(pattern(1000))
        let session = try await withTimeout(10) { try await accepted.value }
        _ = try await withTimeout(10) { try await session.read() }

        try await waitFor("the checks of both idle ends stop") {
            let clientChecks = await client.livenessChecksRunningForTesting()
            let serverChecks = await session.livenessChecksRunningForTesting()
            return !clientChecks && !serverChecks
        }
        try await client.write(pattern(1000, seed: 2))
        #expect(await client.livenessChecksRunningForTesting(), "a write starts the sender's checks")
        _ = try await withTimeout(10) { try await session.read() }
        try await waitFor("the checks stop again") {
            let clientChecks = await client.livenessChecksRunningForTesting()
            let serverChecks = await session.livenessChecksRunningForTesting()
            return !clientChecks && !serverChecks
        }

        try await closeBothEnds(client, session, listener: server)
    }

    /// A subflow that sent something its transport sees acknowledged since the last round has
    /// tested its path already; ACKs alone (UDP) have not. At 10,000 UDP sessions closing at once,
    /// each probed both subflows every second while their closes queued behind.
    @Test("a PROBE round skips subflows that answered the peer's PROBE since the last round, not those that sent only ACKs",
          arguments: NBSOptions.Transport.allCases)
    func probeRoundSkipsSubflowsThatSent(transport: NBSOptions.Transport) async throws {
        let (server, client) = try await listenerAndOpener(over: transport) { $0.probeInterval = .seconds(60) }
            opener: { $0.probeInterval = .seconds(60) }
        let session = try await server.accept()
        // Each attempt: the listener probes twice in a row, then once more after the opener's answer
        // and its own ACKs of it; the opener then has answered (skips), and probes next round; then
        // the listener has answered (skips). A retransmission under a loaded test run is a watched
        // send too and skips a round, so an attempt may be spoiled; without the rules no attempt
        // can give this sequence (ACKs alone would skip every other listener round).
        let expected = [1, 1, 0, 1, 0]
        var seen: [[Int]] = []
        for _ in 0..<5 {
            _ = await session.probeRoundForTesting()
            var counts = [await session.probeRoundForTesting()]  // its own PROBEs do not count
            try await Task.sleep(for: .milliseconds(300))  // the opener's answer, and the listener's ACK of it
            counts.append(await session.probeRoundForTesting())  // what it sent since was ACKs alone
            try await Task.sleep(for: .milliseconds(300))  // that PROBE answered too
            counts.append(await client.probeRoundForTesting())  // it answered the listener's PROBEs
            counts.append(await client.probeRoundForTesting())
            try await Task.sleep(for: .milliseconds(300))
            counts.append(await session.probeRoundForTesting())  // it answered the opener's PROBE
            seen.append(counts)
            if counts == expected { break }
            try await Task.sleep(for: .milliseconds(500))
        }
        #expect(seen.last == expected, "rounds probed: \(seen)")
        try await closeBothEnds(client, session, listener: server)
    }

    /// At 10,000 UDP sessions a burst of delayed answers suspended thousands of idle subflows, and
    /// checking each 20 times a second starved the serve's socket (bench-scale.sh, BENCHMARKS.md).
    @Test("the stall checks run every livenessInterval while session data is unacknowledged, else every idleLivenessInterval")
    func checksSlowDownWithoutData() async throws {
        let server = try await udpListener()
        var options = udpOptions()
        options.idleLivenessInterval = .milliseconds(700)
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let session = try await server.accept()
        try await waitFor("the idle opener's checks at the idle pace or stopped") {
            let interval = await client.livenessIntervalForTesting()
            return interval == nil || interval == .milliseconds(700)
        }
        await client.startLivenessChecksForTesting()
        #expect(await client.livenessIntervalForTesting() == .milliseconds(700), "nothing unacknowledged: the idle pace")
        await client.withSubflowsForTesting(DatagramSubflow.self) { $0.dropEveryForTesting = 1 }
        try await client.write(pattern(1000))
        #expect(await client.livenessIntervalForTesting() == options.livenessInterval, "data unacknowledged: the fast pace")
        await client.withSubflowsForTesting(DatagramSubflow.self) { $0.dropEveryForTesting = 0 }
        _ = try await withTimeout(10, "reading") { try await session.read() }
        try await waitFor("the data acknowledged: the idle pace again, or stopped") {
            let interval = await client.livenessIntervalForTesting()
            return await client.statistics.unacknowledgedBytes == 0 && (interval == nil || interval == .milliseconds(700))
        }
        try await closeBothEnds(client, session, listener: server)
    }

    /// The soak's failing listener in small: it has received all there is and sends nothing but its
    /// PROBEs, its checks have stopped, and then its path dies. Its next PROBE must start the checks,
    /// so that the subflow is suspended and retired. TCP cannot be blackholed on loopback without
    /// root, so its TCP_INFO is replaced by what a dead path shows; UDP loses every datagram it sends.
    @Test("a listener that only receives finds a path that died while it was idle", arguments: NBSOptions.Transport.allCases)
    func receiverFindsDeadPathWhileIdle(transport: NBSOptions.Transport) async throws {
        let (server, client) = try await listenerAndOpener(over: transport) {
            $0.probeInterval = .milliseconds(200)
            $0.stallRetirement = .milliseconds(500)
        } opener: {
            // The opener stays quiet: only the listener's own writes can find the dead path.
            $0.probeInterval = .seconds(60)
            $0.keepaliveInterval = .seconds(60)
        }
        let accepted = Task { try await server.accept() }
        try await client.write(pattern(1000))
        let session = try await withTimeout(10) { try await accepted.value }
        _ = try await withTimeout(10) { try await session.read() }
        try await waitFor("the listener's checks stop") { await !session.livenessChecksRunningForTesting() }

        switch transport {
        case .tcp:
            let dead = SubflowProgress(inFlight: true, silentMs: 60_000, rttMs: 1, timeoutRetransmissions: 3, bytesPerSecond: 0)
            await session.withSubflowsForTesting(SubflowHandler.self) { $0.progressForTesting = dead }
        case .udp:
            await session.withSubflowsForTesting(DatagramSubflow.self) { $0.dropEveryForTesting = 1 }
        }
        // Probes back off to 32 × 200 ms while idle; a few of those, a probe timeout and the retirement.
        let seen = try await withTimeout(30, "the listener retiring its dead subflow") { () -> [SessionEvent] in
            var seen: [SessionEvent] = []
            for await event in session.events {
                seen.append(event)
                if case .subflowDown = event { break }
            }
            return seen
        }
        #expect(seen.contains { if case .subflowStalled = $0 { true } else { false } }, "suspended first: \(seen)")
        #expect(seen.contains { if case .subflowDown(_, let reason) = $0 { reason.contains("no acknowledgement") } else { false } }, "\(seen)")

        await session.abort()
        await client.abort()
        await server.close()
    }

    /// 10,000 idle UDP sessions on one 2-core machine: subflows suspended after a burst of losses
    /// waited for the session's next PROBE, backed off to 32 × `probeInterval`, and were retired at
    /// `stallRetirement` first; only 8,817 of 9,968 sessions still had both subflows. A suspension
    /// now brings the probes back to `probeInterval` (9,975 of 9,975). TCP stands in for the loss
    /// here: its TCP_INFO is made to look dead for one check, then real again.
    @Test("a subflow suspended in an idle session is probed at once, and resumes before its retirement")
    func suspensionInAnIdleSessionProbesSoon() async throws {
        let server = try await listener()
        var options = loopbackOptions()
        options.probeInterval = .milliseconds(100)
        options.stallRetirement = .seconds(2)
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let session = try await server.accept()
        try await client.write(pattern(1000))
        _ = try await withTimeout(10) { try await session.read() }
        // Idle for long enough that the probes back off past the retirement (100, 200, …, 3,200 ms).
        try await Task.sleep(for: .milliseconds(3500))
        let dead = SubflowProgress(inFlight: true, silentMs: 60_000, rttMs: 1, timeoutRetransmissions: 3, bytesPerSecond: 0)
        await client.withSubflowsForTesting(SubflowHandler.self) { $0.progressForTesting = dead }
        // The next backed-off PROBE starts the stall checks; its answer comes before the first check,
        // so after the suspension nothing more arrives unless another PROBE asks for it.
        try await waitFor("suspended", seconds: 8) { await client.subflows.contains { $0.state == .stalled } }
        await client.withSubflowsForTesting(SubflowHandler.self) { $0.progressForTesting = nil }
        try await waitFor("resumed", seconds: 1.5) { await client.subflows.contains { $0.state == .active } }
        let subflows = await client.subflows
        #expect(subflows.allSatisfy { $0.closeReason == nil }, "\(subflows)")
        await session.abort()
        await client.abort()
        await server.close()
    }
}

/// A listener and an opener on loopback over `transport`, each side's options set by its closure.
func listenerAndOpener(over transport: NBSOptions.Transport, listener configureListener: (inout NBSOptions) -> Void,
                       opener configureOpener: (inout NBSOptions) -> Void) async throws -> (Listener, Session) {
    var listenerOptions = NBSOptions()
    listenerOptions.transport = transport
    configureListener(&listenerOptions)
    let server = try await listener(options: listenerOptions)
    var options = loopbackOptions()
    options.transport = transport
    configureOpener(&options)
    let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
    return (server, client)
}

/// Polls `condition` every 20 ms for up to `seconds`.
func waitFor(_ what: String, seconds: Double = 10, _ condition: @escaping @Sendable () async -> Bool) async throws {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    throw TimeoutError(what: what, seconds: seconds)
}

@Suite("Reading TCP_INFO for stall detection")
struct TCPProgressTests {
    @Test("a subflow whose window probes go unanswered twice counts as in flight and timed out; one whose probes are answered does not")
    func unansweredWindowProbesAreTimeouts() {
        var info = tcp_info()
        info.tcpi_rtt = 40_000  // µs
        info.tcpi_unacked = 0
        info.tcpi_retransmits = 0
        info.tcpi_probes = 3
        info.tcpi_last_ack_recv = 5_000  // ms
        let wedged = SubflowProgress(info)
        #expect(wedged.inFlight)
        #expect(wedged.timeoutRetransmissions == 3)
        #expect(wedged.silentMs == 5_000)

        // One probe out: it may just be on its way to a live peer.
        info.tcpi_probes = 1
        #expect(!SubflowProgress(info).inFlight)

        // The peer answers the probes (with a zero window): alive, just not reading. Not a stall.
        info.tcpi_probes = 0
        info.tcpi_last_ack_recv = 150
        let answered = SubflowProgress(info)
        #expect(!answered.inFlight)
        #expect(answered.timeoutRetransmissions == 0)

        // The usual blackhole: data in flight and RTO retransmissions.
        info.tcpi_unacked = 10
        info.tcpi_retransmits = 2
        info.tcpi_last_ack_recv = 900
        let blackholed = SubflowProgress(info)
        #expect(blackholed.inFlight && blackholed.timeoutRetransmissions == 2)
    }

    @Test("the RTT a segment sent now would see: the last measured while data is in flight, the path's base RTT once our queue has drained")
    func currentRTT() {
        var info = KernelTCPInfo()
        info.base.tcpi_rtt = 69_000  // µs: a full 50 ms tbf queue on a 5 Mbit/s path
        info.minRTT = 150
        info.base.tcpi_unacked = 12
        #expect(SubflowProgress(info).currentRttMs == 69)
        info.base.tcpi_unacked = 0
        #expect(SubflowProgress(info).currentRttMs == 0.15)
        info.minRTT = 0  // a kernel before 4.6
        #expect(SubflowProgress(info).currentRttMs == 69)
    }

    @Test("TCP_INFO as far as tcpi_min_rtt: the kernel fills the fields past glibc's struct")
    func kernelFillsMinRTT() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let client = try await ClientBootstrap(group: group).connect(to: server.localAddress!).get()
        try await client.writeAndFlush(ByteBuffer(bytes: [1, 2, 3])).get()
        try await waitFor("the bytes to be acknowledged") {
            (try? await (client as! any SocketOptionProvider).getKernelTCPInfo().get().bytesAcked) ?? 0 >= 4
        }
        let info = try await (client as! any SocketOptionProvider).getKernelTCPInfo().get()
        #expect(info.minRTT > 0 && info.minRTT <= UInt32(max(info.base.tcpi_rtt, 1)) * 10, "min \(info.minRTT) µs, srtt \(info.base.tcpi_rtt) µs")
        try await client.close()
        try await server.close()
    }
}

#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOPosix
import Testing

@testable import NameBasedSockets

/// A TCP address that silently drops every SYN, as a blackholed path does, without root or nft:
/// a listener with a backlog of 1 whose accept queue two connections already fill (Linux holds
/// backlog + 1); Linux drops the SYNs that arrive then, and the connecting side sends them again
/// after 1 s, 3 s, ... (A backlog of 0 would need a SYN cookie to let even the first one in.)
final class SilentTCPAddress {
    static let fillers = 2
    private let listenFD: Int32
    private var fillerFDs: [Int32] = []
    let port: Int

    /// Port 0: one the kernel picks.
    init(host: String, port: Int) throws {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        inet_pton(AF_INET, host, &address.sin_addr)
        let listenFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listenFD = listenFD
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listenFD, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(listenFD, 1) == 0 else {
            self.port = 0
            throw IOError(errnoCode: errno, reason: "bind/listen \(host):\(port)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listenFD, $0, &length) }
        }
        self.port = Int(UInt16(bigEndian: address.sin_port))
        _ = fcntl(listenFD, F_SETFL, fcntl(listenFD, F_GETFL) | O_NONBLOCK)
        for _ in 0..<Self.fillers {
            // Non-blocking, with a bound: a test thread must never sit in a SYN's retransmissions.
            let filler = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            fillerFDs.append(filler)
            let started = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(filler, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            var ready = pollfd(fd: filler, events: Int16(POLLOUT), revents: 0)
            var failure: Int32 = 0
            var failureLength = socklen_t(MemoryLayout<Int32>.size)
            guard started == 0 || (errno == EINPROGRESS && poll(&ready, 1, 2000) == 1
                                   && getsockopt(filler, SOL_SOCKET, SO_ERROR, &failure, &failureLength) == 0 && failure == 0)
            else { throw IOError(errnoCode: failure != 0 ? failure : ETIMEDOUT, reason: "filling the accept queue of \(host):\(self.port)") }
        }
    }

    /// Accepts (and closes) what the queue holds: after the first call the address answers SYNs again.
    func acceptWaiting() -> Int {
        var count = 0
        while true {
            let fd = accept(listenFD, nil, nil)
            guard fd >= 0 else { return count }
            close(fd)
            count += 1
        }
    }

    deinit {
        fillerFDs.forEach { close($0) }
        close(listenFD)
    }
}

/// Opens a session to server.test, and says how long the open took.
func timedOpen(port: Int, options: NBSOptions) async throws -> (Session, Duration) {
    let clock = ContinuousClock()
    let started = clock.now
    let session = try await withTimeout(10) { try await NBS.open(localName: "client.test", peerName: "server.test", port: port, options: options) }
    return (session, clock.now - started)
}

/// Its silent and second addresses are 127.0.0.21-24, which no other suite uses: a port held there
/// (a listen queue kept full, TIME_WAIT) cannot collide with another test's bind.
@Suite("Staggered open attempts (Happy Eyeballs)", .timeLimit(.minutes(2)))
struct OpenRaceTests {
    @Test("a connected attempt opens unless another's OPEN may be on the wire; an unanswered Fast Open SYN gives way")
    func claimRules() {
        #expect(OpenRace.claim(claimant: nil) == .open)
        #expect(OpenRace.claim(claimant: (index: 0, synUnanswered: true)) == .openReplacing(0))
        #expect(OpenRace.claim(claimant: (index: 1, synUnanswered: false)) == .superseded)
    }

    @Test("over UDP the delay is at least a second unless every pair is to start at once; over TCP it is as set")
    func delayPerTransport() {
        var options = NBSOptions()
        #expect(options.effectiveOpenAttemptDelay == .milliseconds(250))
        options.transport = .udp
        #expect(options.effectiveOpenAttemptDelay == .seconds(1))
        options.openAttemptDelay = .seconds(2)
        #expect(options.effectiveOpenAttemptDelay == .seconds(2))
        options.openAttemptDelay = .zero
        #expect(options.effectiveOpenAttemptDelay == .zero)
        options.openAttemptDelay = nil
        #expect(options.effectiveOpenAttemptDelay == nil)
    }

    /// The first server address is silently dead: the open used to wait out its connect timeout
    /// (5 s) before trying the second; now the second's connect starts after `openAttemptDelay`.
    @Test("an open does not wait out a silent first address, and the losing connect is closed")
    func silentFirstAddress() async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.bindAddresses = [try SocketAddress(ipAddress: "127.0.0.1", port: 0)]
        let server = try await NBS.listen(localName: "server.test", port: 0, options: listenerOptions)
        let silent = try SilentTCPAddress(host: "127.0.0.21", port: server.port)
        let accepting = Task { try await server.accept() }
        var twoAddresses = loopbackOptions(peers: ["server.test": ["127.0.0.21", "127.0.0.1"]])
        twoAddresses.maxSubflows = 1  // no JOINs towards the silent address after the open
        let options = twoAddresses
        #expect(options.openAttemptDelay == .milliseconds(250))
        let clock = ContinuousClock()
        let started = clock.now
        let (client, took) = try await timedOpen(port: server.port, options: options)
        // Ten times the 250 ms target; without the race it is the 5 s connect timeout.
        #expect(took < .milliseconds(2500), "open took \(took)")
        let accepted = try await withTimeout(10) { try await accepting.value }
        #expect(await client.subflows.count == 1)
        // The racer that won connected without Fast Open; the session's JOINs still use it.
        let engine = client.engine
        #expect(try await client.loop.submit { (engine.value as? SessionEngine)?.options.tcpFastOpen } .get() == true)

        // The loser's SYN is sent again 1 s after the first; had its socket stayed open, that SYN
        // would now find room in the queue and connect.
        #expect(silent.acceptWaiting() == SilentTCPAddress.fillers)
        try await Task.sleep(for: .milliseconds(1500) - (clock.now - started))
        #expect(silent.acceptWaiting() == 0, "the losing attempt's connect went on")

        let data = pattern(20_000, seed: 21)
        try await client.write(data)
        await client.finish()
        let (count, digest) = try await withTimeout(10) { try await drain(accepted) }
        #expect(count == data.readableBytes && digest == sha256(data))
        try await accepted.close()
        try await client.close()
        await server.close()
    }

    /// A peer known to be legacy gets plain TCP connects, raced as RFC 8305 has them.
    @Test("a plain TCP open does not wait out a silent first address either, and the losing connect is closed")
    func silentFirstAddressPlainTCP() async throws {
        let plain = try await PlainServer.start(.echo, host: "127.0.0.22")
        let silent = try SilentTCPAddress(host: "127.0.0.21", port: plain.port)
        var options = legacyOptions(.legacyOnly, peer: "server.test")
        options.resolver = StaticResolver(["server.test": ["127.0.0.21", "127.0.0.22"]])
        let clock = ContinuousClock()
        let started = clock.now
        let (session, took) = try await timedOpen(port: plain.port, options: options)
        #expect(took < .milliseconds(2500), "open took \(took)")
        #expect(session.isLegacy)
        #expect(silent.acceptWaiting() == SilentTCPAddress.fillers)
        try await Task.sleep(for: .milliseconds(1500) - (clock.now - started))
        #expect(silent.acceptWaiting() == 0, "the losing connect went on")
        let data = pattern(50_000, seed: 22)
        #expect(try await withTimeout(10) { try await echo(data, over: session) } == sha256(data))
        #expect(await plain.log.connections.count == 1)
        try await session.close()
        await plain.stop()
    }

    /// Every address silent: a cancelled open closes its connects at once, instead of leaving them
    /// to their timeout, and sends nothing more.
    @Test("a cancelled open ends at once and closes every attempt")
    func cancelledOpen() async throws {
        let first = try SilentTCPAddress(host: "127.0.0.21", port: 0)
        let second = try SilentTCPAddress(host: "127.0.0.22", port: first.port)
        var twoAddresses = loopbackOptions(peers: ["server.test": ["127.0.0.21", "127.0.0.22"]])
        twoAddresses.maxSubflows = 1
        let options = twoAddresses
        let clock = ContinuousClock()
        let started = clock.now
        let port = first.port
        let opening = Task { try await NBS.open(localName: "client.test", peerName: "server.test", port: port, options: options) }
        try await Task.sleep(for: .milliseconds(400))  // both attempts in flight
        opening.cancel()
        do {
            _ = try await withTimeout(10) { try await opening.value }
            Issue.record("a cancelled open returned a session")
        } catch is CancellationError {
        } catch {
            Issue.record("a cancelled open failed with \(error), not CancellationError")
        }
        let took = clock.now - started
        #expect(took < .milliseconds(2500), "a cancelled open took \(took), its attempts' connect timeout is 5 s")
        #expect(first.acceptWaiting() == SilentTCPAddress.fillers && second.acceptWaiting() == SilentTCPAddress.fillers)
        try await Task.sleep(for: .milliseconds(1500) - (clock.now - started))
        #expect(first.acceptWaiting() == 0 && second.acceptWaiting() == 0, "a cancelled attempt's connect went on")
    }

    /// Every address silent: the attempts overlap, so the open fails after about one connect
    /// timeout and three delays, not one timeout per pair.
    @Test("with every address silent an open fails after one connect timeout, not one per pair")
    func everyAddressSilent() async throws {
        let first = try SilentTCPAddress(host: "127.0.0.21", port: 0)
        let others = try (22...24).map { try SilentTCPAddress(host: "127.0.0.\($0)", port: first.port) }
        var fourAddresses = loopbackOptions(peers: ["server.test": (21...24).map { "127.0.0.\($0)" }])
        fourAddresses.connectTimeout = .seconds(1)
        let options = fourAddresses, port = first.port
        let clock = ContinuousClock()
        let started = clock.now
        do {
            _ = try await withTimeout(20) { try await NBS.open(localName: "client.test", peerName: "server.test", port: port, options: options) }
            Issue.record("an open to four silent addresses succeeded")
        } catch let error as NBSError {
            // Every pair is named in the failure.
            for host in 21...24 { #expect("\(error)".contains("127.0.0.\(host)"), "\(error)") }
        }
        let took = clock.now - started
        // 1.75 s staggered; one pair at a time it is 4 s.
        #expect(took < .milliseconds(3000), "the open took \(took) to fail")
        _ = others
    }

    /// Over UDP the hello is the OPEN, so attempts race whole hellos; the claim comes with ACCEPT,
    /// and the listener admits only on the opener's DATA_ACK, which a loser never sends.
    @Test("over UDP an open does not wait out a silent first address, and the loser's hellos stop")
    func silentFirstAddressOverUDP() async throws {
        let server = try await udpListener { $0.bindAddresses = [try! SocketAddress(ipAddress: "127.0.0.1", port: 0)] }
        let hellos = Tally()
        let silent = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { $0.pipeline.addHandler(DatagramTally(bytes: Tally(), datagrams: hellos)) }
            .bind(host: "127.0.0.21", port: server.port).get()
        let accepting = Task { try await server.accept() }
        var twoAddresses = udpOptions()
        twoAddresses.resolver = StaticResolver(["server.test": ["127.0.0.21", "127.0.0.1"]])
        twoAddresses.maxSubflows = 1
        let options = twoAddresses
        let (client, took) = try await timedOpen(port: server.port, options: options)
        // The UDP floor is 1 s; one pair at a time it is the 5 s handshake budget.
        #expect(took < .milliseconds(2500), "open took \(took)")
        let accepted = try await withTimeout(10) { try await accepting.value }
        #expect(hellos.count >= 1, "the first attempt's hello went to the silent address")
        try await Task.sleep(for: .milliseconds(300))
        let afterOpen = hellos.count
        try await Task.sleep(for: .milliseconds(1500))
        #expect(hellos.count == afterOpen, "the losing attempt kept sending its hello")
        try await closeBothEnds(client, accepted, listener: server)
        try await silent.close()
    }

    /// With no delay every pair starts at once and both reach the listener: one session, not two.
    @Test("attempts started together reach one listener twice and it admits one session", arguments: [NBSOptions.Transport.tcp, .udp])
    func simultaneousAttemptsAdmitOneSession(transport: NBSOptions.Transport) async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.transport = transport
        // On addresses of this suite's own: a port picked on 127.0.0.1 and let go may be taken at
        // once by another test's connection from there.
        listenerOptions.bindAddresses = [try SocketAddress(ipAddress: "127.0.0.21", port: 0)]
        let probe = try await NBS.listen(localName: "server.test", port: 0, options: listenerOptions)
        listenerOptions.bindAddresses = [try SocketAddress(ipAddress: "127.0.0.21", port: probe.port), try SocketAddress(ipAddress: "127.0.0.22", port: probe.port)]
        await probe.close()
        let server = try await NBS.listen(localName: "server.test", port: probe.port, options: listenerOptions)
        var bothAtOnce = loopbackOptions(peers: ["server.test": ["127.0.0.22", "127.0.0.21"]])
        bothAtOnce.transport = transport
        bothAtOnce.maxSubflows = 1
        bothAtOnce.openAttemptDelay = .zero
        // The loser's connection, closed by us, is no answer from the server: it must not be taken
        // for a legacy one (which would make every later open plain TCP).
        bothAtOnce.legacyFallback = .fallback
        bothAtOnce.legacyPeers = LegacyPeerCache()
        let options = bothAtOnce
        for round in 0..<3 {
            let client = try await withTimeout(10) { try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options) }
            let accepted = try await withTimeout(10) { try await server.accept() }
            let data = pattern(10_000, seed: UInt64(round))
            try await client.write(data)
            await client.finish()
            let (count, digest) = try await withTimeout(10) { try await drain(accepted) }
            #expect(count == data.readableBytes && digest == sha256(data))
            async let acceptedClosed: Void = accepted.close()
            try await client.close()
            try await acceptedClosed
            #expect(!client.isLegacy && !options.legacyPeers.isLegacy("server.test", port: server.port), "round \(round)")
        }
        do {
            let extra = try await withTimeout(1.5) { try await server.accept() }
            Issue.record("the listener admitted a second session for one open")
            await extra.abort()
        } catch is TimeoutError {}
        await server.close()
    }
}

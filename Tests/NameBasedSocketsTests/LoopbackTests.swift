import Crypto
import NBSProtocol
import NIOCore
import NIOPosix
import Testing

@testable import NameBasedSockets

/// Real sockets on loopback. 127.0.0.1, 127.0.0.2, ... and ::1 stand in for a multihomed host.
@Suite("Loopback sessions", .timeLimit(.minutes(3)))
struct LoopbackTests {
    @Test("open by name, transfer both ways, close gracefully", arguments: NBSOptions.Transport.allCases)
    func echoRoundTrip(transport: NBSOptions.Transport) async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.transport = transport
        var options = loopbackOptions()
        options.transport = transport
        let server = try await listener(options: listenerOptions)
        #expect(server.transport == transport)
        let serverTask = Task {
            let session = try await server.accept()
            #expect(session.localName == "server.test")
            #expect(session.peerName == "client.test")
            #expect(session.peerVerification == .claimed)
            while let chunk = try await session.read() { try await session.write(chunk) }
            try await session.close()
        }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let data = pattern(1_000_000)
        let echoed = Task { try await drain(client) }
        try await client.write(data)
        await client.finish()
        let (count, digest) = try await withTimeout(30) { try await echoed.value }
        #expect(count == data.readableBytes)
        #expect(digest == sha256(data))
        try await client.close()
        try await serverTask.value
        await server.close()
    }

    @Test("64 MiB over three subflows while the two busiest are closed mid-transfer: every byte once, in order")
    func transferSurvivesKilledSubflows() async throws {
        let server = try await listener()
        let received = Task { () -> (Int, [UInt8], SessionStatistics) in
            let session = try await server.accept()
            let result = try await drain(session)
            try await session.close()
            return (result.bytes, result.digest, await session.statistics)
        }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port,
                                        options: loopbackOptions(locals: ["127.0.0.1", "127.0.0.2", "127.0.0.3"]))
        try await waitForSubflows(client, count: 3)
        let total = 64 * 1024 * 1024
        let chunk = pattern(1024 * 1024, seed: 7)
        var hash = SHA256()
        var retired: [Int] = []
        for i in 0..<(total / chunk.readableBytes) {
            try await client.write(chunk)
            chunk.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
            // From the 16th and the 40th MiB on, retire the subflow with the most data in flight
            // (at the first moment one has some), so that data must be reinjected on the others.
            if (i >= 16 && retired.isEmpty) || (i >= 40 && retired.count == 1) {
                let bytes = await client.retireBusiestSubflow()
                if bytes > 0 { retired.append(bytes) }
            }
        }
        #expect(retired.count == 2)
        await client.finish()
        let (count, digest, serverStats) = try await withTimeout(120, "receiving 64 MiB") { try await received.value }
        try await client.close()
        #expect(count == total)
        #expect(digest == Array(hash.finalize()))
        let subflows = await client.subflows
        #expect(subflows.count == 3)
        #expect(subflows.filter { $0.bytesSent > 0 }.count >= 2)
        #expect(subflows.filter { $0.closeReason != nil }.count >= 2)
        let stats = await client.statistics
        #expect(stats.maxConcurrentSubflows == 3)
        #expect(stats.reinjectedBytes > 0)
        _ = serverStats
        await server.close()
    }

    @Test("a subflow replaced mid-transfer drains first: what it carries arrives as sent, nothing is sent again, and its replacement joins after it")
    func replacedSubflowDrains() async throws {
        var limit = NBSOptions()
        limit.maxSubflows = 2
        let server = try await listener(options: limit)
        let received = Task { () -> (Int, [UInt8]) in
            let session = try await server.accept()
            let result = try await drain(session)
            try await session.close()
            return result
        }
        var options = loopbackOptions(locals: ["127.0.0.1", "127.0.0.2"])
        options.maxSubflows = 2
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        try await waitForSubflows(client, count: 2)
        let total = 32 * 1024 * 1024
        let chunk = pattern(1024 * 1024, seed: 11)
        var hash = SHA256()
        var inFlightAtReplacement = 0
        var statesAfterReplacement: [SubflowState] = []
        for i in 0..<(total / chunk.readableBytes) {
            try await client.write(chunk)
            chunk.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
            if i >= 8, inFlightAtReplacement == 0 {
                inFlightAtReplacement = await client.replaceBusiestSubflow()
                if inFlightAtReplacement > 0 { statesAfterReplacement = await client.subflows.map(\.state) }
            }
        }
        await client.finish()
        let (count, digest) = try await withTimeout(60, "receiving 32 MiB") { try await received.value }
        try await client.close()
        #expect(count == total)
        #expect(digest == Array(hash.finalize()))
        #expect(inFlightAtReplacement > 0)
        #expect(statesAfterReplacement.contains(.draining) || statesAfterReplacement.contains(.closed), "\(statesAfterReplacement)")
        let subflows = await client.subflows
        let replaced = subflows.filter { $0.closeReason == "replaced by test" }
        #expect(replaced.count == 1 && replaced[0].bytesSent > 0, "\(subflows)")
        // Both addresses are on lo, one path: the replacement stands by for the other subflow.
        #expect(subflows.count == 3, "the replacement joined: \(subflows)")
        let stats = await client.statistics
        // A loaded machine can hold the drain silent past max(40 ms, RTT), which ends it with the
        // rest reinjected (`silentDrainEnds`); CI did so once, with 8 kB left. Only a drain that
        // ran to the end must send nothing again.
        #expect(stats.drainsCutShort <= 1)
        #expect(stats.drainsCutShort == 1 || stats.reinjectedBytes == 0, "a drained subflow's data is not sent again: \(stats)")
        #expect(stats.maxConcurrentSubflows == 2)
        await server.close()
    }

    /// The peer's DATA_ACKs are dropped on arrival, so nothing the carrier sent is known to have
    /// arrived, and its TCP_INFO is replaced by a tail loss's (see `headOfLineCopied`).
    @Test("a draining subflow that goes silent with data in flight ends its drain at once: what it carries goes again elsewhere")
    func silentDrainEnds() async throws {
        let server = try await listener()
        let received = drainNextSession(server)
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port,
                                        options: loopbackOptions(locals: ["127.0.0.1", "127.0.0.2"]))
        let carrier = try await carrierAndStandby(of: client)
        await client.dropArrivingFramesForTesting([.dataAck])
        let total = 2 << 20
        try await client.write(pattern(total, seed: 21))
        #expect(await client.replaceBusiestSubflow() > 0)
        // Draining, or its drain already ended by a real silence (a loaded machine's receiver can
        // leave TCP without an ACK for max(40 ms, RTT): one CI run); `drainsCutShort` below tells
        // either from a subflow closed without a drain.
        let state = await client.subflows.first { $0.id == carrier }?.state
        #expect(state == .draining || state == .closed, "\(String(describing: state))")
        let tailLoss = SubflowProgress(inFlight: true, silentMs: 100, rttMs: 1, timeoutRetransmissions: 0, bytesPerSecond: 0, silenceClockedByKernel: true)
        await client.withSubflowsForTesting(SubflowHandler.self) { if $0.id.rawValue == carrier { $0.progressForTesting = tailLoss } }
        // Stall checks run every 50 ms; ended by its own limit instead, the drain would take 1.5 s.
        let clock = ContinuousClock()
        let start = clock.now
        try await waitFor("the drain to end") { await client.subflows.first { $0.id == carrier }?.state == .closed }
        let waited = clock.now - start
        #expect(waited < .nanoseconds(SessionEngine.drainLimit.nanoseconds), "\(waited)")
        try await waitFor("the reinjection") { await client.statistics.reinjectedBytes > 0 }
        #expect(await client.statistics.drainsCutShort == 1)
        await client.dropArrivingFramesForTesting([])
        await client.finish()
        #expect(try await withTimeout(30, "receiving") { try await received.value } == total)
        try await client.close()
        await server.close()
    }

    @Test("two subflows over lo, between the same two interfaces: one carries the data and the other stands by, on both ends; with siblingSubflowsStandBy off both are active",
          arguments: [true, false])
    func siblingsStandBy(standBy: Bool) async throws {
        var serverOptions = NBSOptions()
        serverOptions.siblingSubflowsStandBy = standBy
        let server = try await listener(options: serverOptions)
        let received = Task { () -> (Session, Int) in
            let session = try await server.accept()
            let (bytes, _) = try await drain(session)
            return (session, bytes)
        }
        var options = loopbackOptions(locals: ["127.0.0.1", "127.0.0.2"])
        options.siblingSubflowsStandBy = standBy
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        try await waitForSubflows(client, count: 2)
        let total = 8 * 1024 * 1024
        try await client.write(pattern(total, seed: 3))
        await client.finish()
        let (serverSession, count) = try await withTimeout(60, "receiving") { try await received.value }
        #expect(count == total)
        let clientSubflows = await client.subflows
        let serverSubflows = await serverSession.subflows
        let expected: [SubflowState] = standBy ? [.active, .standby] : [.active, .active]
        #expect(clientSubflows.map(\.state).sorted { $0.rawValue < $1.rawValue } == expected, "\(clientSubflows)")
        // The listener groups them by the opener's INTERFACE hints (and its own interface).
        #expect(serverSubflows.map(\.state).sorted { $0.rawValue < $1.rawValue } == expected, "\(serverSubflows)")
        if standBy {
            // Nothing but head-of-line copies, which a loaded machine draws from the carrier (its
            // silence of 40 ms and more) and which count where they went.
            let copied = await client.statistics.headOfLineCopiedBytes
            #expect(clientSubflows.first { $0.state == .standby }?.bytesSent == copied, "\(clientSubflows)")
            #expect(clientSubflows.first { $0.state == .active }?.bytesSent == total)
        }
        try await closeBothEnds(client, serverSession, listener: server)
    }

    /// A blackhole takes a whole path: the standby sibling of a stalled carrier must not take the
    /// data before it is shown alive, or it is found dead one RTO later with that data (the
    /// blackhole benchmark's stall doubled, 164-378 ms to 539-767 ms). TCP cannot be blackholed on
    /// loopback without root, so the carrier's TCP_INFO is replaced by what a dead path shows; the
    /// sibling's is real, so its next PROBE's answer resumes it.
    @Test("a stalled carrier's standby sibling is suspended with it, and resumes on its own first acknowledgement")
    func stalledCarrierSuspendsItsSibling() async throws {
        let server = try await listener()
        let received = drainNextSession(server)
        var options = loopbackOptions(locals: ["127.0.0.1", "127.0.0.2"])
        // Probes far apart, and a quiet moment before the fault, so that the sibling stays suspended
        // (no acknowledgement comes its way) long enough to be seen so: with 1 s, a test process
        // starved beside three busy loops missed that window (1 of 10 suite runs). Kept under the
        // default stallRetirement (3 s): a longer interval would retire the sibling before its PROBE.
        options.probeInterval = .seconds(2)
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let carrier = try await carrierAndStandby(of: client)
        try await Task.sleep(for: .milliseconds(200))
        let dead = SubflowProgress(inFlight: true, silentMs: 60_000, rttMs: 1, timeoutRetransmissions: 3, bytesPerSecond: 0)
        await client.withSubflowsForTesting(SubflowHandler.self) { if $0.id.rawValue == carrier { $0.progressForTesting = dead } }
        // Not left to the next PROBE, which an idle session backs off to seconds away.
        await client.startLivenessChecksForTesting()
        try await waitFor("both suspended") { await client.subflows.filter { $0.state == .stalled }.count == 2 }
        // Written only now, so everything the sibling carries went after its own resumption.
        let total = 4 * 1024 * 1024
        try await client.write(pattern(total, seed: 9))
        await client.finish()
        #expect(try await withTimeout(30, "receiving") { try await received.value } == total)
        let subflows = await client.subflows
        #expect(subflows.first { $0.id == carrier }?.bytesSent == 0, "\(subflows)")
        #expect(subflows.first { $0.id != carrier }?.bytesSent == total, "\(subflows)")
        try await client.close()
        await server.close()
    }

    /// `client`'s two subflows, on one pair of interfaces, settled as a carrier and its standby
    /// sibling: the carrier's id.
    private func carrierAndStandby(of client: Session) async throws -> UInt32 {
        try await waitForSubflows(client, count: 2)
        try await waitFor("a carrier and a standby") { await client.subflows.map(\.state).sorted { $0.rawValue < $1.rawValue } == [.active, .standby] }
        return try #require(await client.subflows.first { $0.state == .active }).id
    }

    /// A tail loss cannot be made on loopback without root: the carrier's TCP_INFO is replaced by
    /// what one shows (data in flight, no acknowledgement for 100 ms, no timeout yet), while its
    /// socket goes on delivering for real.
    @Test("a carrier silent with the peer's head of line has that data copied to another subflow; it is not suspended, and the stream stays whole")
    func headOfLineCopied() async throws {
        let server = try await listener()
        let received = Task { () -> (Int, [UInt8], SessionStatistics) in
            let session = try await server.accept()
            let (bytes, digest) = try await drain(session)
            let statistics = await session.statistics
            try await session.close()
            return (bytes, digest, statistics)
        }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port,
                                        options: loopbackOptions(locals: ["127.0.0.1", "127.0.0.2"]))
        let carrier = try await carrierAndStandby(of: client)
        let tailLoss = SubflowProgress(inFlight: true, silentMs: 100, rttMs: 1, timeoutRetransmissions: 0, bytesPerSecond: 0, silenceClockedByKernel: true)
        await client.withSubflowsForTesting(SubflowHandler.self) { if $0.id.rawValue == carrier { $0.progressForTesting = tailLoss } }
        // Written until a copy was made: a stall check runs every 50 ms while data is unacknowledged.
        let chunks = try await withTimeout(30, "a copy") {
            var chunks: UInt64 = 0
            while await client.statistics.headOfLineCopiedBytes == 0 {
                chunks += 1
                try await client.write(pattern(1 << 20, seed: 100 + chunks))
            }
            return chunks
        }
        // Copies may go on meanwhile: the count first, then the subflows' totals, which include it.
        let copied = await client.statistics.headOfLineCopiedBytes
        let subflows = await client.subflows
        #expect(subflows.first { $0.id == carrier }?.state == .active, "\(subflows)")
        #expect((subflows.first { $0.id != carrier }?.bytesSent ?? 0) >= copied, "the copy counts where it went: \(subflows)")
        await client.finish()
        var sent = ByteBuffer()
        for i in 1...chunks { sent.writeImmutableBuffer(pattern(1 << 20, seed: 100 + i)) }
        let (count, digest, statistics) = try await withTimeout(30, "receiving") { try await received.value }
        #expect(count == sent.readableBytes)
        #expect(digest == sha256(sent))
        #expect(statistics.duplicateBytesReceived > 0, "\(statistics)")
        try await client.close()
        await server.close()
    }

    /// Under `handover` the standby path carries nothing while the primary works: the same tail
    /// loss as above copies nothing onto the backup.
    @Test("handover: a primary silent with the peer's head of line copies none of it onto the backup")
    func headOfLineNotCopiedToBackup() async throws {
        let server = try await listener()
        let received = drainNextSession(server)
        var options = loopbackOptions(locals: ["127.0.0.1", "127.0.0.2"])
        options.policy = .handover
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        try await waitForSubflows(client, count: 2)
        try await waitFor("a primary and a backup") { await client.subflows.map(\.state).sorted { $0.rawValue < $1.rawValue } == [.active, .backup] }
        let primary = try #require(await client.subflows.first { $0.state == .active }).id
        let tailLoss = SubflowProgress(inFlight: true, silentMs: 100, rttMs: 1, timeoutRetransmissions: 0, bytesPerSecond: 0, silenceClockedByKernel: true)
        await client.withSubflowsForTesting(SubflowHandler.self) { if $0.id.rawValue == primary { $0.progressForTesting = tailLoss } }
        // Written for half a second: ten stall checks at least (one every 50 ms while data is
        // unacknowledged), each of which, aggregating, copied the head of line (the test above).
        let clock = ContinuousClock()
        let start = clock.now
        var total = 0
        while clock.now - start < .milliseconds(500) {
            try await client.write(pattern(1 << 20, seed: UInt64(total)))
            total += 1 << 20
        }
        await client.finish()
        #expect(try await withTimeout(30, "receiving") { try await received.value } == total)
        let subflows = await client.subflows
        #expect(await client.statistics.headOfLineCopiedBytes == 0)
        #expect(subflows.first { $0.id != primary }?.bytesSent == 0, "\(subflows)")
        try await client.close()
        await server.close()
    }

    @Test("a name with A and AAAA records gets an IPv4 and an IPv6 subflow")
    func dualStack() async throws {
        let server = try await listener()
        let accepted = Task { try await server.accept() }
        var options = NBSOptions()
        options.resolver = StaticResolver(["server.test": ["127.0.0.1", "::1"]])
        options.localAddresses = [try SocketAddress(ipAddress: "127.0.0.1", port: 0), try SocketAddress(ipAddress: "::1", port: 0)]
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        try await waitForSubflows(client, count: 2)
        let families = Set(await client.subflows.map { $0.remote.protocol == .inet6 ? 6 : 4 })
        #expect(families == [4, 6])
        let session = try await accepted.value
        await client.abort(reason: "test over")
        await session.abort()
        await server.close()
    }

    @Test("the subflow limit caps the full mesh")
    func subflowLimit() async throws {
        let server = try await listener()
        let accepted = Task { try await server.accept() }
        var options = loopbackOptions(locals: ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"])
        options.maxSubflows = 2
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        try await waitForSubflows(client, count: 2)
        try await Task.sleep(for: .milliseconds(200))
        #expect(await client.subflows.filter { $0.state != .closed }.count == 2)
        await client.abort()
        _ = try? await accepted.value
        await server.close()
    }

    @Test("an OPEN for a name the listener does not serve is refused with that reason")
    func wrongNameRefused() async throws {
        let server = try await listener("server.test")
        var options = loopbackOptions(peers: ["other.test": ["127.0.0.1"]])
        options.handshakeTimeout = .seconds(5)
        await #expect(throws: NBSError.refused(reason: .nameNotServed, message: "this listener serves server.test, not other.test")) {
            _ = try await NBS.open(localName: "client.test", peerName: "other.test", port: server.port, options: options)
        }
        await server.close()
    }

    @Test("losing every path is not fatal: the session waits, rejoins and delivers everything")
    func waitsAndResumes() async throws {
        let server = try await listener()
        let received = Task { () -> (Int, [UInt8]) in
            let session = try await server.accept()
            let result = try await drain(session)
            try await session.close()
            return result
        }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: loopbackOptions())
        let recorder = Task { () -> [SessionEvent] in
            var seen: [SessionEvent] = []
            for await event in client.events { seen.append(event) }
            return seen
        }
        let data = pattern(4 * 1024 * 1024, seed: 11)
        try await client.write(data.getSlice(at: 0, length: 2 * 1024 * 1024)!)
        await client.killSubflow(0)
        try await client.write(data.getSlice(at: 2 * 1024 * 1024, length: 2 * 1024 * 1024)!)
        await client.finish()
        let (count, digest) = try await withTimeout(30) { try await received.value }
        try await client.close()
        #expect(count == data.readableBytes)
        #expect(digest == sha256(data))
        let events = await recorder.value
        #expect(events.contains(.waiting))
        #expect(events.contains(.resumed))
        await server.close()
    }

    @Test("after the grace period without a path, the session fails with a clear error on both ends")
    func graceExpires() async throws {
        let server = try await listener()
        let accepted = Task { try await server.accept() }
        var options = loopbackOptions()
        options.waitingGracePeriod = .milliseconds(300)
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let serverSession = try await accepted.value
        await server.close()  // nothing to rejoin
        await client.killSubflow(0)
        await #expect(throws: NBSError.allSubflowsLost) {
            _ = try await withTimeout(10) { try await client.read() }
        }
        await serverSession.abort()
    }

    @Test("garbage, a bad JOIN and an unknown token are refused without disturbing a live session")
    func badInputIsolated() async throws {
        // Legacy clients are refused here, so that garbage is refused rather than served.
        var nbsOnly = NBSOptions()
        nbsOnly.acceptLegacyClients = false
        let server = try await listener(options: nbsOnly)
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: loopbackOptions())
        let serverSession = try await accepted.value

        // Not NBS at all.
        let garbage = try await RawPeer.exchange(port: server.port, send: Array("GET / HTTP/1.0\r\n\r\n".utf8))
        #expect(garbage.closed)
        // A well-formed JOIN for a token that does not exist.
        let join = joinBytes(.init(token: 42, nonce: randomBytes(16), backup: false, mac: randomBytes(32)))
        let unknown = try await RawPeer.exchange(port: server.port, send: join)
        #expect(unknown.frames.contains { if case .abort(let c) = $0 { c.reason == .unknownToken } else { false } })
        // An oversized frame header.
        var huge = ByteBuffer()
        NBSWire.writePreamble(into: &huge)
        huge.writeBytes([FrameType.open.rawValue, 0, 0x7F, 0xFF, 0xFF, 0xFF])
        let tooLarge = try await RawPeer.exchange(port: server.port, send: Array(huge.readableBytesView))
        #expect(tooLarge.closed)

        // The live session is untouched.
        let data = pattern(100_000, seed: 3)
        try await client.write(data)
        await client.finish()
        let (count, digest) = try await withTimeout(20) { try await drain(serverSession) }
        #expect(count == 100_000)
        #expect(digest == sha256(data))
        try await serverSession.close()
        try await client.close()
        await server.close()
    }

    @Test("writes wait while the peer does not read (backpressure), and resume when it does")
    func backpressure() async throws {
        var options = loopbackOptions()
        options.sendBufferCapacity = 256 * 1024
        options.receiveCapacity = 256 * 1024
        var serverOptions = NBSOptions()
        serverOptions.receiveCapacity = 256 * 1024
        let server = try await listener(options: serverOptions)
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let serverSession = try await accepted.value
        // Far more than the send buffer, receive window and socket buffers together.
        let block = pattern(256 * 1024, seed: 5)
        let writer = Task {
            for _ in 0..<64 { try await client.write(block) }
            await client.finish()
        }
        try await Task.sleep(for: .milliseconds(500))
        let unacknowledged = await client.statistics.unacknowledgedBytes
        #expect(unacknowledged <= options.sendBufferCapacity)
        let (count, _) = try await withTimeout(60) { try await drain(serverSession) }
        try await writer.value
        #expect(count == 64 * 256 * 1024)
        try await serverSession.close()
        try await client.close()
        await server.close()
    }

    /// One hop back to the reader per pass of the loop, not per frame: answered at the first
    /// frame, a reader came back for each of the others.
    @Test("the DATA that arrives in one pass of the loop reaches a waiting reader in one read, as the slices it came in")
    func oneReadPerPass() async throws {
        let (server, client, accepted) = try await connectedPair()
        let reading = Task { try await client.readSegments() }
        try await withTimeout(10) {
            while await client.waitingReadsForTesting() == 0 { try await Task.sleep(for: .milliseconds(5)) }
        }
        let payloads = (0..<3).map { pattern(100, seed: UInt64($0)) }
        await client.receiveForTesting(payloads.enumerated().map { .data(.init(sequence: UInt64($0.offset * 100), payload: $0.element)) }, onSubflow: 0)
        let segments = try await withTimeout(10) { try await reading.value }
        #expect(segments == payloads)
        // The server never sent those bytes, so it refuses their acknowledgement: no graceful close.
        await client.abort()
        await accepted.abort()
        await server.close()
    }

    /// As a SwiftNIO handler runs: each call made and answered on the session's own thread.
    @Test("under Session.taskExecutor an application's calls run and resume on the session's loop; the stream is whole, and cancellation is as elsewhere")
    func applicationOnTheSessionsLoop() async throws {
        let (server, client, accepted) = try await connectedPair()
        let data = pattern(3 << 20, seed: 11)
        let receiving = Task {
            try await withTaskExecutorPreference(accepted.taskExecutor) { () async throws -> (Int, [UInt8], Bool) in
                var onLoop = accepted.loop.inEventLoop
                var hash = SHA256()
                var count = 0
                while let segments = try await accepted.readSegments() {
                    onLoop = onLoop && accepted.loop.inEventLoop
                    for segment in segments {
                        count += segment.readableBytes
                        segment.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
                    }
                }
                return (count, Array(hash.finalize()), onLoop)
            }
        }
        let wroteOnLoop = try await withTimeout(60) {
            try await withTaskExecutorPreference(client.taskExecutor) {
                var onLoop = client.loop.inEventLoop
                var rest = data
                while rest.readableBytes > 0 {
                    try await client.write(rest.readSlice(length: min(256 * 1024, rest.readableBytes))!)
                    onLoop = onLoop && client.loop.inEventLoop
                }
                await client.finish()
                return onLoop && client.loop.inEventLoop
            }
        }
        let (count, digest, readOnLoop) = try await withTimeout(60) { try await receiving.value }
        #expect(wroteOnLoop)
        #expect(readOnLoop)
        #expect(count == data.readableBytes)
        #expect(digest == sha256(data))

        try await expectCancelledWaits(rounds: 6) {
            try await withTaskExecutorPreference(client.taskExecutor) { try await client.read() }
        }
        // Cancelled before it is called: it takes none of its bytes, though on the loop it could at once.
        let cancelledWrite = Task {
            while !Task.isCancelled { await Task.yield() }
            try await withTaskExecutorPreference(accepted.taskExecutor) { try await accepted.write(ByteBuffer(string: "never sent")) }
        }
        cancelledWrite.cancel()
        await #expect(throws: CancellationError.self) { try await withTimeout(5) { try await cancelledWrite.value } }
        try await accepted.write(ByteBuffer(string: "after the cancelled calls"))
        let next = try await withTimeout(10) { try await client.read() }
        #expect(next.map { String(buffer: $0) } == "after the cancelled calls")
        try await closeBothEnds(client, accepted, listener: server)
    }

    @Test("a cancelled read ends with CancellationError and consumes nothing: the bytes go to the next read", arguments: NBSOptions.Transport.allCases)
    func cancelledRead(transport: NBSOptions.Transport) async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.transport = transport
        var options = loopbackOptions()
        options.transport = transport
        let (server, client, accepted) = try await connectedPair(listenerOptions: listenerOptions, options: options)
        try await expectCancelledWaits(rounds: 20) { try await accepted.read() }
        try await client.write(ByteBuffer(string: "after the cancelled reads"))
        let next = try await withTimeout(10) { try await accepted.read() }
        #expect(next.map { String(buffer: $0) } == "after the cancelled reads")
        try await closeBothEnds(client, accepted, listener: server)
    }

    @Test("a cancelled write returns once some of its bytes were taken and throws CancellationError when none were; the stream stays whole",
          arguments: NBSOptions.Transport.allCases)
    func cancelledWrite(transport: NBSOptions.Transport) async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.transport = transport
        listenerOptions.receiveCapacity = 64 * 1024
        var options = loopbackOptions()
        options.transport = transport
        options.sendBufferCapacity = 64 * 1024
        let (server, client, accepted) = try await connectedPair(listenerOptions: listenerOptions, options: options)
        // The server does not read: both buffers fill, with most of `first` still waiting.
        let first = pattern(4 << 20, seed: 7)
        let (firstReturned, laterCancelled) = try await cancelWhileWriting(client, first) {
            // Queued behind the rest of `first`, so none of it is taken: withdrawn.
            let queued = Task { try await client.write(pattern(1000, seed: 8)) }
            try await Task.sleep(for: .milliseconds(100))
            queued.cancel()
            await #expect(throws: CancellationError.self) { try await withTimeout(5) { try await queued.value } }
        }
        #expect(firstReturned)
        #expect(laterCancelled)
        let draining = Task { try await drain(accepted) }
        try await withTimeout(60) { try await client.write(ByteBuffer(string: "trailer")) }
        await client.finish()
        let (count, digest) = try await withTimeout(60) { try await draining.value }
        #expect(count == first.readableBytes + 7)
        #expect(digest == sha256(first + ByteBuffer(string: "trailer")))
        try await closeBothEnds(client, accepted, listener: server)
    }

    @Test("a cancelled close ends its wait with CancellationError; the close goes on, and ends once the peer closes")
    func cancelledClose() async throws {
        let (server, client, accepted) = try await connectedPair()
        let alreadyCancelled = Task {
            while !Task.isCancelled { await Task.yield() }
            try await client.close()
        }
        alreadyCancelled.cancel()
        await #expect(throws: CancellationError.self) { try await withTimeout(5) { try await alreadyCancelled.value } }
        let waiting = Task { try await client.close() }
        try await Task.sleep(for: .milliseconds(100))
        waiting.cancel()
        await #expect(throws: CancellationError.self) { try await withTimeout(5) { try await waiting.value } }
        // The close began with the first call, cancelled as it was: the peer reads the end of the stream.
        #expect(try await withTimeout(10) { try await accepted.read() } == nil)
        try await withTimeout(10) { try await accepted.close() }
        try await withTimeout(10) { try await client.close() }
        await server.close()
    }

    /// The soak's lost final ack (CI at f481cd3): the peer finished and went, and its DATA_ACK of
    /// our DATA_FIN and its CLOSE were lost with its subflows. Here they are dropped on arrival.
    @Test("a close missing only the peer's ack of our DATA_FIN ends as closed at the close timeout; with our data unacknowledged it fails",
          arguments: [false, true])
    func closeWithLostFinalAck(ourDataOutstanding: Bool) async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.closeTimeout = .seconds(1)
        let (server, client, accepted) = try await connectedPair(listenerOptions: listenerOptions)
        try await client.write(pattern(10_000))
        await client.finish()
        let (count, _) = try await withTimeout(10) { try await drain(accepted) }
        #expect(count == 10_000)
        await accepted.dropArrivingFramesForTesting([.dataAck, .close])
        if ourDataOutstanding { try await accepted.write(pattern(1_000)) }
        let clientSide = Task { () -> Int in
            let (count, _) = try await drain(client)
            try await client.close()
            return count
        }
        let start = ContinuousClock.now
        if ourDataOutstanding {
            await #expect(throws: NBSError.closeTimedOut) { try await withTimeout(10) { try await accepted.close() } }
            await client.abort()
        } else {
            try await withTimeout(10) { try await accepted.close() }
            #expect(ContinuousClock.now - start >= .seconds(1), "not before the close timeout")
            #expect(try await withTimeout(10) { try await clientSide.value } == 0)
        }
        clientSide.cancel()
        await server.close()
    }

    @Test("a cancelled accept ends with CancellationError, before or after it reached the loop; the next session goes to the next accept")
    func cancelledAccept() async throws {
        let server = try await listener()
        try await expectCancelledWaits(rounds: 20) { try await server.accept() }
        let next = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: loopbackOptions())
        let accepted = try await withTimeout(10) { try await next.value }
        #expect(accepted.peerName == "client.test")
        try await closeBothEnds(client, accepted, listener: server)
    }
}

func waitForSubflows(_ session: Session, count: Int, seconds: Double = 10) async throws {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if await session.subflows.filter({ $0.state.isUp }).count >= count { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("fewer than \(count) subflows came up within \(seconds) s: \(await session.subflows)")
}

/// A plain TCP peer that sends bytes and collects what comes back until the connection closes.
enum RawPeer {
    struct Result: Sendable {
        var bytes: [UInt8]
        var closed: Bool
        var frames: [Frame] {
            var buffer = ByteBuffer(bytes: bytes)
            var decoder = FrameDecoder(expectPreamble: true)
            var frames: [Frame] = []
            while let frame = try? decoder.next(from: &buffer) { frames.append(frame) }
            return frames
        }
    }

    final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let promise: EventLoopPromise<Result>
        let received: NIOLoopBoundBox<[UInt8]>
        init(promise: EventLoopPromise<Result>, loop: any EventLoop) {
            self.promise = promise
            self.received = .init([], eventLoop: loop)
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            received.value += Array(Self.unwrapInboundIn(data).readableBytesView)
        }
        func channelInactive(context: ChannelHandlerContext) {
            promise.succeed(Result(bytes: received.value, closed: true))
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    static func exchange(port: Int, send: [UInt8], seconds: Int64 = 10) async throws -> Result {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let promise = loop.makePromise(of: Result.self)
        let channel = try await ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Collector(promise: promise, loop: loop)) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        try await channel.writeAndFlush(ByteBuffer(bytes: send))
        loop.scheduleTask(in: .seconds(seconds)) { channel.close(promise: nil) }
        return try await promise.futureResult.get()
    }
}

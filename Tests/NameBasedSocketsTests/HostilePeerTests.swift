import Foundation
import NBSProtocol
import NIOCore
import NIOPosix
import Testing

@testable import NameBasedSockets

/// Listener options for the attacks: the probe sessions measure responsiveness, and under a
/// sanitizer or a loaded machine a slow probe could otherwise be taken for a silent legacy client
/// (the Bursts suite covers that detection).
func hostileListenerOptions() -> NBSOptions {
    var options = NBSOptions()
    options.acceptLegacyClients = false
    return options
}

/// A well-behaved session, opened and used while an attack runs: how long it takes shows whether
/// the listener stayed responsive.
func probeSession(_ server: Listener, bytes: Int = 100_000) async throws -> Duration {
    let start = ContinuousClock.now
    let accepted = Task { try await server.accept() }
    let client = try await NBS.open(localName: "probe.test", peerName: "server.test", port: server.port, options: loopbackOptions())
    let session = try await withTimeout(10, "accept during the attack") { try await accepted.value }
    let data = pattern(bytes, seed: 3)
    try await client.write(data)
    await client.finish()
    let (count, digest) = try await withTimeout(10, "transfer during the attack") { try await drain(session) }
    #expect(count == bytes)
    #expect(digest == sha256(data))
    try await session.close()
    try await client.close()
    return ContinuousClock.now - start
}

/// Hostile peers against one listener: each attack runs while well-behaved sessions open and
/// transfer, and leaves no state or buffer behind (descriptors are counted by the soak scenario,
/// in a process of its own: here other suites run alongside). Timing bounds are generous sanity
/// bounds (a probe session takes a few ms here).
@Suite("Hostile peers", .serialized, .timeLimit(.minutes(2)))
struct HostilePeerTests {
    @Test("slowloris: half-open handshakes held open are closed after handshakeTimeout; others are served meanwhile")
    func slowloris() async throws {
        var options = hostileListenerOptions()
        options.handshakeTimeout = .seconds(1)
        let server = try await listener(options: options)
        // The preamble and half an OPEN: an NBS client that never finishes its handshake.
        var open = ByteBuffer()
        NBSWire.writePreamble(into: &open)
        FrameEncoder.encode(.open(ClientHandshake(sourceName: "slow.test", destinationName: "server.test", port: 1).open), into: &open)
        let half = open.getSlice(at: 0, length: open.readableBytes / 2)!
        var held: [RawConnection] = []
        for _ in 0..<50 {
            let raw = try await RawConnection(port: server.port)
            try await raw.channel.writeAndFlush(half)
            held.append(raw)
        }
        let during = try await probeSession(server)
        #expect(during < .seconds(5))
        // Each is closed by the listener, with a reason, after the handshake timeout.
        for raw in held {
            let frames = try await raw.frames { _ in false }
            #expect(frames.contains { if case .abort(let c) = $0 { c.reason == .timeout } else { false } })
        }
        #expect(await server.stateCounts().pending == 0)
        for raw in held { await raw.close() }
        await server.close()
    }

    @Test("a JOIN flood with bad tokens is refused one by one; a live session and new ones are unaffected")
    func joinFlood() async throws {
        let server = try await listener(options: hostileListenerOptions())
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: loopbackOptions())
        let live = try await accepted.value
        let baseline = await server.stateCounts()
        let refusedCount = try await withThrowingTaskGroup(of: Bool.self) { group in
            for i in 0..<200 {
                group.addTask {
                    let raw = try await RawConnection(port: server.port)
                    let join = Frame.Join(token: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, nonce: randomBytes(NBSWire.nonceLength), backup: false,
                                          mac: randomBytes(32))
                    try await raw.send([.join(join)], preamble: true)
                    let frames = try await raw.frames { _ in false }
                    await raw.close()
                    return frames.contains { if case .abort(let c) = $0 { c.reason == .unknownToken } else { false } }
                }
            }
            return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(refusedCount == 200)
        let during = try await probeSession(server)
        #expect(during < .seconds(5))
        let data = pattern(300_000, seed: 4)
        try await client.write(data)
        await client.finish()
        let (count, digest) = try await withTimeout(20) { try await drain(live) }
        #expect(count == 300_000 && digest == sha256(data))
        #expect(await server.stateCounts() == baseline)
        try await live.close()
        try await client.close()
        await server.close()
    }

    @Test("a frame announcing a huge length is refused at its header, at once, without waiting for the payload")
    func hugeLength() async throws {
        var options = hostileListenerOptions()
        options.handshakeTimeout = .seconds(30)
        let server = try await listener(options: options)
        for type: UInt8 in [0x01, 0x02, 0x10] { // OPEN, JOIN, DATA
            let raw = try await RawConnection(port: server.port)
            var bytes = ByteBuffer()
            NBSWire.writePreamble(into: &bytes)
            bytes.writeInteger(type)
            bytes.writeInteger(UInt8(0))
            bytes.writeInteger(UInt32.max)
            let start = ContinuousClock.now
            try await raw.channel.writeAndFlush(bytes)
            let frames = try await raw.frames { _ in false }
            // Closed long before the 30 s handshake timeout: the header alone was enough.
            #expect(ContinuousClock.now - start < .seconds(5), "type \(type)")
            #expect(frames.allSatisfy { if case .abort = $0 { true } else { false } })
            await raw.close()
        }
        #expect(await server.stateCounts().pending == 0)
        _ = try await probeSession(server)
        await server.close()
    }

    @Test("a receiver that never reads: both ends' buffers stay within their capacities, the writer waits")
    func receiverNeverReads() async throws {
        var options = loopbackOptions()
        options.sendBufferCapacity = 1 << 20
        var serverOptions = hostileListenerOptions()
        serverOptions.receiveCapacity = 1 << 20
        let server = try await listener(options: serverOptions)
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let never = try await accepted.value
        let block = pattern(1 << 20, seed: 6)
        let writer = Task {
            for _ in 0..<256 { try await client.write(block) } // 256 MiB: far beyond every buffer
        }
        try await Task.sleep(for: .seconds(2))
        let sent = await client.statistics
        let held = await never.statistics
        #expect(sent.unacknowledgedBytes <= options.sendBufferCapacity)
        // The window the receiver advertised bounds what it holds; segments in flight may add one.
        #expect(held.unreadBytes <= serverOptions.receiveCapacity + NBSWire.maxDataPayload)
        #expect(held.unreadBytes > 0)
        // Still writing: the writer waits, it is neither done nor failed.
        try await Task.sleep(for: .milliseconds(200))
        #expect(await client.statistics.unacknowledgedBytes <= options.sendBufferCapacity)
        _ = try await probeSession(server)
        writer.cancel()
        await client.abort()
        await never.abort()
        await server.close()
    }
}

@Suite("Bursts", .timeLimit(.minutes(2)))
struct BurstTests {
    /// Found by the soak: under a burst of opens from one process, an opener's OPEN could come later
    /// than the listener's legacy-detection delay, and the listener took it for a silent legacy
    /// client. The preamble now goes out as TCP connects, from the event loop. The delay here is the
    /// default (1 s). Shorter ones each proved too tight under the full parallel suite on a loaded
    /// 2-core machine: 20 ms failed about one run in six, 100 ms three runs of nine, and 300 ms one
    /// CI run in about ten (2026-11-27). Most likely what is late then is the opener's loop, not the
    /// preamble: a burst's attempts are queued on it together, and NIO runs them all, each making
    /// its key (X25519 at -O0 in a debug build), before it reads any connect's completion, so the
    /// first connections wait for the others' set-up while the listener's clock runs. The openers'
    /// handshake timeout is 30 s: one CI run's burst once lost an open to the default of then, 5 s
    /// ("no ACCEPT and admission"), though a burst alone takes 0.4 s. How long an open takes under
    /// load is not what this test checks; taken for legacy, an opener fails at once (its late OPEN
    /// is reset).
    @Test("a burst of 100 concurrent opens is classified NBS every time")
    func burstOfOpens() async throws {
        let server = try await listener(options: NBSOptions())
        let acceptor = Task {
            var sessions: [Session] = []
            for _ in 0..<100 { sessions.append(try await server.accept()) }
            return sessions
        }
        let openerOptions = {
            var options = loopbackOptions()
            options.handshakeTimeout = .seconds(30)
            return options
        }()
        let clients = try await withThrowingTaskGroup(of: Session.self) { group in
            for _ in 0..<100 {
                group.addTask { try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: openerOptions) }
            }
            return try await group.reduce(into: [Session]()) { $0.append($1) }
        }
        let accepted = try await withTimeout(30) { try await acceptor.value }
        #expect(clients.count == 100)
        #expect(accepted.allSatisfy { !$0.isLegacy && $0.peerName == "client.test" })
        for session in clients + accepted { await session.abort() }
        await server.close()
    }
}

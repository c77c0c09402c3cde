import NIOCore
import Testing

@testable import NameBasedSockets

/// A session that has ended must free its engine: a server runs for months, and whatever one ended
/// session keeps, every session it ever served keeps.
@Suite("Session lifetime", .timeLimit(.minutes(2)))
struct SessionLifetimeTests {
    final class WeakEngine: @unchecked Sendable {
        weak var engine: AnyObject?
    }

    static func watch(_ session: Session) async throws -> WeakEngine {
        let box = WeakEngine()
        let engine = session.engine
        try await session.loop.submit { box.engine = engine.value as AnyObject }.get()
        #expect(box.engine != nil)
        return box
    }

    /// Opens a session, echoes a little both ways, closes both ends; returns the engines, weakly.
    static func runOneSession(transport: NBSOptions.Transport, server: Listener) async throws -> (WeakEngine, WeakEngine) {
        var options = loopbackOptions()
        options.transport = transport
        let served = Task { () -> WeakEngine in
            let session = try await server.accept()
            let box = try await watch(session)
            while let chunk = try await session.read() { try await session.write(chunk) }
            try await session.close()
            return box
        }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let clientBox = try await watch(client)
        let echoed = Task { try await drain(client) }
        try await client.write(pattern(10_000))
        await client.finish()
        #expect(try await withTimeout(10) { try await echoed.value }.bytes == 10_000)
        try await client.close()
        return (clientBox, try await withTimeout(10) { try await served.value })
    }

    /// Both close timeouts are 30 s (loopbackOptions, NBSOptions' default): a NIO task armed with
    /// the engine kept every closed engine that long (a serve grew by 12 KiB per session a second).
    @Test("both ends free their engine once a session has closed", arguments: NBSOptions.Transport.allCases)
    func enginesFreedAfterClose(transport: NBSOptions.Transport) async throws {
        var listenerOptions = NBSOptions()
        listenerOptions.transport = transport
        let server = try await listener(options: listenerOptions)
        let (opener, listenerSide) = try await Self.runOneSession(transport: transport, server: server)
        try? await waitFor("both engines freed", seconds: 5) { opener.engine == nil && listenerSide.engine == nil }
        #expect(opener.engine == nil, "the opener's engine outlived its session")
        #expect(listenerSide.engine == nil, "the listener's engine outlived its session")
        await server.close()
    }

    @Test("a legacy session frees its connection once closed")
    func legacyConnectionFreedAfterClose() async throws {
        let plain = try await PlainServer.start(.silentThenCount)
        let box = try await Self.runOneLegacySession(port: plain.port)
        try? await waitFor("the legacy connection freed", seconds: 5) { box.engine == nil }
        #expect(box.engine == nil, "the legacy connection outlived its session")
        await plain.stop()
    }

    static func runOneLegacySession(port: Int) async throws -> WeakEngine {
        let session = try await NBS.open(localName: "client.test", peerName: "legacy.test", port: port, options: legacyOptions(.legacyOnly))
        #expect(session.isLegacy)
        let box = try await watch(session)
        let answer = Task { try await drain(session) }
        try await session.write(pattern(10_000))
        // Closed before the server's answer has come: the close waits for it, its timeout armed.
        try await withTimeout(10) { try await session.close() }
        #expect(try await answer.value.bytes > 0)
        return box
    }
}

import NBSProtocol
import NIOCore
import Testing

@testable import NameBasedSockets

/// Set-up in round trips, counted on the wire with a hand-driven opener rather than timed: an OPEN
/// that announces a receive window is admitted at OPEN, so the listener's verdict and its
/// application's first bytes follow the ACCEPT without waiting for anything more from the opener.
@Suite("Admission at OPEN", .timeLimit(.minutes(1)))
struct EarlyAdmissionTests {
    static let window: UInt32 = 1 << 20

    /// Accepts one session and writes `reply` on it; the session is returned for inspection.
    static func acceptAndReply(_ server: Listener, _ reply: [UInt8]) -> Task<Session, any Error> {
        Task {
            let session = try await server.accept()
            try await session.write(ByteBuffer(bytes: reply))
            return session
        }
    }

    static func isData(_ frame: Frame) -> Bool { if case .data = frame { true } else { false } }

    @Test("an OPEN with a window gets ACCEPT, the verdict and the application's first bytes, and the opener sends nothing else")
    func admittedAtOpen() async throws {
        let server = try await listener(options: loopbackOptions(peers: [:]))
        let accepted = Self.acceptAndReply(server, [7, 8, 9])
        let (raw, handshake) = try await RawConnection.open(to: server, receiveWindow: Self.window)
        let frames = try await raw.frames(until: Self.isData)
        // The verdict (DATA_ACK) comes first; then the listener's INTERFACE hint, then the bytes.
        #expect(frames.map(\.type) == [.accept, .dataAck, .interface, .data])
        if case .accept(let accept) = frames.first { _ = try handshake.complete(with: accept) }
        if case .data(let data) = frames.last { #expect(Array(data.payload.readableBytesView) == [7, 8, 9]) }
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerVerification == .claimed)
        await raw.close()
        await session.abort()
        await server.close()
    }

    @Test("a listener that looks names up resolves the opener's name at OPEN, and admits without the opener's DATA_ACK")
    func lookupStartsAtOpen() async throws {
        var options = loopbackOptions(peers: ["raw.test": ["127.0.0.1"]])
        options.lookUpPeerNames = true
        let server = try await listener(options: options)
        let accepted = Self.acceptAndReply(server, [1])
        let (raw, _) = try await RawConnection.open(to: server, receiveWindow: Self.window)
        let frames = try await raw.frames(until: Self.isData)
        #expect(frames.map(\.type) == [.accept, .dataAck, .interface, .data])
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerVerification == .dnsConfirmed)
        await raw.close()
        await session.abort()
        await server.close()
    }

    @Test("an OPEN without a window is admitted only after the opener's DATA_ACK, as before")
    func withoutWindowTheVerdictWaits() async throws {
        let server = try await listener(options: loopbackOptions(peers: [:]))
        let accepted = Self.acceptAndReply(server, [5])
        let (raw, _) = try await RawConnection.open(to: server)
        let hello = try await raw.frames(until: { $0.type == .accept })
        #expect(hello.map(\.type) == [.accept])
        // Nothing more comes while the opener is silent: the listener waits for its part.
        try await Task.sleep(for: .milliseconds(300))
        #expect(await server.stateCounts().verifying == 1)
        try await raw.send([.dataAck(.init(cumulativeAck: 0, window: Self.window))])
        let rest = try await raw.frames(until: Self.isData)
        #expect(rest.map(\.type) == [.dataAck, .interface, .data])
        let session = try await withTimeout(10) { try await accepted.value }
        await raw.close()
        await session.abort()
        await server.close()
    }

    @Test("an opener that announced a window and then sends IDENTITY is refused while its name is being looked up")
    func identityAfterAWindowIsRefused() async throws {
        var options = loopbackOptions(peers: [:])
        options.requiredPeerVerification = .dnsConfirmed
        // A slow resolver keeps the session in verification while the IDENTITY arrives.
        struct Slow: NameResolver {
            func resolve(_ name: String, port: Int) async throws -> [SocketAddress] {
                try await Task.sleep(for: .seconds(30))
                return []
            }
        }
        options.resolver = Slow()
        let server = try await listener(options: options)
        let (raw, handshake) = try await RawConnection.open(to: server, receiveWindow: Self.window)
        let hello = try await raw.frames(until: { $0.type == .accept })
        guard case .accept(let accept) = try #require(hello.last) else { return }
        let transcript = HandshakeTranscript(open: handshake.open, accept: accept)
        _ = try handshake.complete(with: accept)
        try await raw.send([.identity(NBSIdentity().prove(transcript, as: .client))])
        let answer = try await raw.frames(until: { $0.type == .abort })
        guard case .abort(let close) = try #require(answer.last) else {
            Issue.record("not refused: \(answer)")
            return
        }
        #expect(close.reason == .protocolViolation)
        await raw.close()
        await server.close()
    }

    @Test("openers announce a window only when nothing they send or decide after ACCEPT could change the outcome")
    func whichOpenersAnnounceAWindow() throws {
        var options = NBSOptions()
        #expect(options.admitsAtOpen("server.example"))
        options.requiredPeerVerification = .dnsConfirmed
        #expect(!options.admitsAtOpen("server.example"))
        options = NBSOptions()
        options.pinnedKeys = ["Server.Example.": [UInt8](repeating: 1, count: 32)]
        #expect(!options.admitsAtOpen("server.example"))
        #expect(options.admitsAtOpen("other.example"))
        options = NBSOptions()
        let key = NBSIdentity()
        #expect(!options.admitsAtOpen(key.selfCertifyingName))
        options.identity = key
        #expect(!options.admitsAtOpen("server.example"))
    }
}

import Foundation
import NBSProtocol
import NIOCore
import NIOPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import NameBasedSockets

@Suite("Verification levels as a pure function")
struct VerificationLevelTests {
    let key = NBSIdentity()

    @Test("DNS: the source among the name's addresses is dnsConfirmed, otherwise claimed with the addresses named")
    func dns() {
        var e = PeerEvidence(claimedName: "client.example", sourceAddress: "192.0.2.9", resolvedAddresses: ["198.51.100.2", "192.0.2.9"])
        #expect(NameVerifier.evaluate(e).level == .dnsConfirmed)
        // A dual-stack listener sees IPv4 peers as mapped IPv6.
        e.sourceAddress = "::ffff:192.0.2.9"
        #expect(NameVerifier.evaluate(e).level == .dnsConfirmed)
        e.resolvedAddresses = ["198.51.100.2"]
        let result = NameVerifier.evaluate(e)
        #expect(result.level == .claimed)
        #expect(result.detail == "name client.example resolves to 198.51.100.2, not 192.0.2.9")
        #expect(!result.forgery)
        e.resolvedAddresses = nil
        e.resolutionFailure = "NXDOMAIN"
        #expect(NameVerifier.evaluate(e).level == .claimed)
        #expect(NameVerifier.evaluate(e).detail.contains("NXDOMAIN"))
        // IPv6 written two ways is one address.
        let v6 = PeerEvidence(claimedName: "h.example", sourceAddress: "2001:db8::1", resolvedAddresses: ["2001:0db8:0:0::1"])
        #expect(NameVerifier.evaluate(v6).level == .dnsConfirmed)
    }

    @Test("an address literal is never more than claimed, and is not looked up")
    func literal() {
        let e = PeerEvidence(claimedName: "192.0.2.9", sourceAddress: "192.0.2.9", resolvedAddresses: ["192.0.2.9"])
        #expect(NameVerifier.evaluate(e).level == .claimed)
        #expect(!NameVerifier.needsResolution("192.0.2.9", pinned: false))
        #expect(!NameVerifier.needsResolution("2001:db8::9", pinned: false))
        #expect(NameVerifier.needsResolution("client.example", pinned: false))
        #expect(!NameVerifier.needsResolution("client.example", pinned: true))
        #expect(!NameVerifier.needsResolution(key.selfCertifyingName, pinned: false))
    }

    @Test("self-certifying: its own key is keyVerified; no key or another key is a forgery")
    func selfCertifying() {
        var e = PeerEvidence(claimedName: key.selfCertifyingName, sourceAddress: "192.0.2.9", provenKey: key.publicKey)
        #expect(NameVerifier.evaluate(e).level == .keyVerified)
        e.provenKey = nil
        #expect(NameVerifier.evaluate(e).forgery)
        e.provenKey = NBSIdentity().publicKey
        let other = NameVerifier.evaluate(e)
        #expect(other.forgery)
        #expect(other.level == .claimed)
        #expect(NameVerifier.refusal(other, required: .claimed) != nil)
    }

    @Test("pinned: the pinned key is keyVerified even without DNS; no key or another key is a forgery")
    func pinned() {
        var e = PeerEvidence(claimedName: "client.example", sourceAddress: "192.0.2.9", resolvedAddresses: ["192.0.2.9"],
                             provenKey: key.publicKey, pinnedKey: key.publicKey)
        #expect(NameVerifier.evaluate(e).level == .keyVerified)
        e.resolvedAddresses = nil
        #expect(NameVerifier.evaluate(e).level == .keyVerified)
        e.provenKey = NBSIdentity().publicKey
        #expect(NameVerifier.evaluate(e).forgery)
        // DNS would confirm it, but the pin says a key is needed.
        e.provenKey = nil
        e.resolvedAddresses = ["192.0.2.9"]
        let unproven = NameVerifier.evaluate(e)
        #expect(unproven.forgery)
        #expect(unproven.detail.contains("proved no key"))
    }

    @Test("a proven key on an unpinned ordinary name says nothing about the name")
    func unpinnedKey() {
        let e = PeerEvidence(claimedName: "client.example", sourceAddress: "192.0.2.9", resolvedAddresses: ["198.51.100.2"], provenKey: key.publicKey)
        #expect(NameVerifier.evaluate(e).level == .claimed)
    }

    @Test("a requirement is met by its level or a higher one")
    func requirement() {
        let levels: [PeerVerification] = [.claimed, .dnsConfirmed, .keyVerified]
        for (i, level) in levels.enumerated() {
            for (j, required) in levels.enumerated() {
                let result = VerificationResult(level: level, detail: "d", forgery: false)
                #expect((NameVerifier.refusal(result, required: required) == nil) == (i >= j))
            }
        }
        let short = NameVerifier.refusal(VerificationResult(level: .claimed, detail: "name a resolves to b, not c", forgery: false), required: .dnsConfirmed)
        #expect(short == "dnsConfirmed required, peer is only claimed: name a resolves to b, not c")
    }
}

@Suite("Identity key files")
struct IdentityKeyFileTests {
    func temporaryPath() -> String { "/tmp/nbs-identity-test-\(UInt64.random(in: 0 ... .max))" }

    @Test("created with mode 0600, loaded back, never overwritten")
    func createAndLoad() throws {
        let path = temporaryPath()
        defer { unlink(path) }
        let created = try IdentityKeyFile.create(at: path)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600)
        #expect(try IdentityKeyFile.load(from: path) == created)
        #expect(throws: IdentityError.keyFile(path: path, reason: "already exists; not overwriting it")) { try IdentityKeyFile.create(at: path) }
        #expect(try IdentityKeyFile.load(from: path) == created)
        // No temporary file is left beside it.
        // (Not readdir's d_name as a 256-byte array: the kernel's record is only as long as the
        // name, and AddressSanitizer caught the read past it.)
        let base = String(path.split(separator: "/").last!)
        for name in try FileManager.default.contentsOfDirectory(atPath: "/tmp") {
            #expect(!(name.hasPrefix(base) && name != base), "left \(name)")
        }
    }

    @Test("a key file readable or writable by group or others is refused with the fix")
    func permissions() throws {
        let path = temporaryPath()
        defer { unlink(path) }
        _ = try IdentityKeyFile.create(at: path)
        for mode: mode_t in [0o644, 0o640, 0o604, 0o620, 0o602] {
            #expect(chmod(path, mode) == 0)
            let expected = IdentityError.keyFile(path: path, reason: "mode \(String(mode, radix: 8)) lets group or others read or write it; run chmod 600 \(path)")
            #expect(throws: expected) { try IdentityKeyFile.load(from: path) }
        }
        #expect(chmod(path, 0o400) == 0)
        _ = try IdentityKeyFile.load(from: path)
    }

    @Test("missing, garbage and truncated key files are refused with a reason")
    func badFiles() throws {
        let missing = temporaryPath()
        #expect(throws: IdentityError.self) { try IdentityKeyFile.load(from: missing) }
        for content in ["", "hello\n", "ed25519 AAAA\n", "ed25519 not-base64!\n", "rsa \(Base64.encode(randomBytes(32)))\n"] {
            let path = temporaryPath()
            defer { unlink(path) }
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
            _ = Array(content.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
            #expect(throws: IdentityError.self, "\(content)") { try IdentityKeyFile.load(from: path) }
        }
    }
}

/// Options for one end of a loopback session with verification settings.
private func endOptions(names: [String: [String]], require: PeerVerification = .claimed, identity: NBSIdentity? = nil,
                        pins: [String: [UInt8]] = [:]) -> NBSOptions {
    var options = loopbackOptions(peers: names)
    options.requiredPeerVerification = require
    options.identity = identity
    options.pinnedKeys = pins
    // These tests are about NBS peers: a connection that is not NBS is refused, not taken for a
    // legacy client (which a listener does by default, after legacyDetectionDelay of silence).
    options.acceptLegacyClients = false
    return options
}

/// True when no session waits for accept(): nothing reached the application.
private func acceptStaysPending(_ server: Listener) async -> Bool {
    await server.stateCounts().ready == 0
}

/// Waits (bounded) until the listener holds nothing for sessions being set up.
/// Settled for 100 ms in a row: a connection whose peer has already gone may still be waiting to be
/// accepted, and a single look can fall just before it (once, inside the loaded parallel suite).
private func settled(_ server: Listener, sessions: Int = 0) async throws {
    var steady = 0
    for _ in 0..<250 {
        let counts = await server.stateCounts()
        if counts.pending == 0, counts.verifying == 0, counts.sessions == sessions {
            steady += 1
            if steady == 5 { return }
        } else {
            steady = 0
        }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("listener state did not settle: \(await server.stateCounts())")
}

@Suite("Peer verification on loopback", .timeLimit(.minutes(2)))
struct VerificationLoopbackTests {
    @Test("without a requirement a listener looks names up only when asked to (lookUpPeerNames)")
    func lookupIsOptIn() async throws {
        let counting = CountingResolver(StaticResolver(["client.test": ["127.0.0.1"]]))
        var serverOptions = endOptions(names: [:])
        serverOptions.resolver = counting
        let clientOptions = endOptions(names: ["server.test": ["127.0.0.1"]])
        for lookUp in [false, true] {
            serverOptions.lookUpPeerNames = lookUp
            let server = try await listener(options: serverOptions)
            let accepted = Task { try await server.accept() }
            let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: clientOptions)
            let session = try await withTimeout(10) { try await accepted.value }
            #expect(session.peerVerification == (lookUp ? .dnsConfirmed : .claimed))
            #expect(counting.count == (lookUp ? 1 : 0))
            await client.abort()
            await session.abort()
            await server.close()
        }
    }

    @Test("a listener requiring dns refuses a client whose name resolves elsewhere, on both ends, and accepts one that resolves here")
    func requireDNS() async throws {
        let serverOptions = endOptions(names: ["client.test": ["198.51.100.2"], "good.test": ["192.0.2.1", "127.0.0.1"]], require: .dnsConfirmed)
        let server = try await listener(options: serverOptions)
        let clientOptions = endOptions(names: ["server.test": ["127.0.0.1"]])
        let expected = NBSError.refused(reason: .verificationFailed,
                                        message: "dnsConfirmed required, peer is only claimed: name client.test resolves to 198.51.100.2, not 127.0.0.1")
        await #expect(throws: expected) {
            _ = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: clientOptions)
        }
        #expect(await acceptStaysPending(server))
        try await settled(server)

        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "good.test", peerName: "server.test", port: server.port, options: clientOptions)
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerName == "good.test")
        #expect(session.peerVerification == .dnsConfirmed)
        // The opener dialled a name its resolver gave: the listener's address is among its addresses.
        #expect(client.peerVerification == .dnsConfirmed)
        try await client.write(pattern(1000))
        await client.finish()
        let (count, _) = try await withTimeout(10) { try await drain(session) }
        #expect(count == 1000)
        try await session.close()
        try await client.close()
        await server.close()
    }

    @Test("with nothing required, an unconfirmed name is admitted as claimed; a literal address is claimed")
    func reportsClaimed() async throws {
        // Named by its address, as a host without a name would be.
        let server = try await listener("127.0.0.1", options: endOptions(names: ["client.test": ["198.51.100.2"]]))
        let accepted = Task { try await server.accept() }
        var literal = endOptions(names: [:])
        literal.resolver = SystemResolver()
        let client = try await NBS.open(localName: "client.test", peerName: "127.0.0.1", port: server.port, options: literal)
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerVerification == .claimed)
        #expect(client.peerVerification == .claimed)
        await client.abort()
        await session.abort()
        await server.close()
    }

    @Test("a listener requiring key admits a self-certifying client that proves its key, refuses one that does not")
    func requireKey() async throws {
        let identity = NBSIdentity()
        let server = try await listener(options: endOptions(names: [:], require: .keyVerified))
        let clientNames = ["server.test": ["127.0.0.1"]]
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: identity.selfCertifyingName, peerName: "server.test", port: server.port,
                                        options: endOptions(names: clientNames, identity: identity))
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerVerification == .keyVerified)
        #expect(session.peerName == identity.selfCertifyingName)
        await client.abort()
        await session.abort()

        // The same name without the key: a forgery.
        do {
            _ = try await NBS.open(localName: identity.selfCertifyingName, peerName: "server.test", port: server.port, options: endOptions(names: clientNames))
            Issue.record("a self-certifying name without its key was admitted")
        } catch NBSError.refused(let reason, let message) {
            #expect(reason == .verificationFailed)
            #expect(message == "\(identity.selfCertifyingName) is self-certifying, but the peer proved no key")
        }
        // Another identity's proof under this name.
        do {
            _ = try await NBS.open(localName: identity.selfCertifyingName, peerName: "server.test", port: server.port,
                                   options: endOptions(names: clientNames, identity: NBSIdentity()))
            Issue.record("a self-certifying name with another key was admitted")
        } catch NBSError.refused(let reason, _) {
            #expect(reason == .verificationFailed)
        }
        // An ordinary name confirmed by nothing.
        await #expect(throws: NBSError.self) {
            _ = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: endOptions(names: clientNames))
        }
        #expect(await acceptStaysPending(server))
        try await settled(server)
        await server.close()
    }

    @Test("a pinned name is keyVerified with its key and refused with another key or none, even with nothing required")
    func pinnedKeys() async throws {
        let pinned = NBSIdentity()
        let server = try await listener(options: endOptions(names: ["client.test": ["127.0.0.1"]], pins: ["Client.Test.": pinned.publicKey]))
        let clientNames = ["server.test": ["127.0.0.1"]]
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port,
                                        options: endOptions(names: clientNames, identity: pinned))
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerVerification == .keyVerified)
        await client.abort()
        await session.abort()

        let impostor = NBSIdentity()
        do {
            _ = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: endOptions(names: clientNames, identity: impostor))
            Issue.record("a pinned name with the wrong key was admitted")
        } catch NBSError.refused(let reason, let message) {
            #expect(reason == .verificationFailed)
            #expect(message == "client.test is pinned to key \(Base64.encode(pinned.publicKey)), but the peer proved key \(Base64.encode(impostor.publicKey))")
        }
        await #expect(throws: NBSError.self) {
            _ = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: endOptions(names: clientNames))
        }
        #expect(await acceptStaysPending(server))
        try await settled(server)
        await server.close()
    }

    @Test("an opener requiring key refuses a listener without an identity: typed error here, ABORT there, nothing accepted")
    func openerRequiresKey() async throws {
        let server = try await listener(options: endOptions(names: ["client.test": ["127.0.0.1"]]))
        let expected = NBSError.verificationFailed(peer: "server.test",
                                                   reason: "keyVerified required, peer is only dnsConfirmed: name server.test resolves to 127.0.0.1")
        await #expect(throws: expected) {
            _ = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port,
                                   options: endOptions(names: ["server.test": ["127.0.0.1"]], require: .keyVerified))
        }
        #expect(await acceptStaysPending(server))
        try await settled(server)

        // The listener's identity pinned by the opener: keyVerified both ways round.
        let serverIdentity = NBSIdentity()
        let keyed = try await listener(options: { var o = endOptions(names: ["client.test": ["127.0.0.1"]]); o.identity = serverIdentity; o.lookUpPeerNames = true; return o }())
        let accepted = Task { try await keyed.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: keyed.port,
                                        options: endOptions(names: ["server.test": ["127.0.0.1"]], require: .keyVerified,
                                                            pins: ["server.test": serverIdentity.publicKey]))
        #expect(client.peerVerification == .keyVerified)
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(session.peerVerification == .dnsConfirmed)
        // A pin for the listener's name with another key: refused even without a requirement.
        await #expect(throws: NBSError.self) {
            _ = try await NBS.open(localName: "client.test", peerName: "server.test", port: keyed.port,
                                   options: endOptions(names: ["server.test": ["127.0.0.1"]], pins: ["server.test": NBSIdentity().publicKey]))
        }
        await client.abort()
        await session.abort()
        await server.close()
        await keyed.close()
    }

    @Test("refused sessions, bad proofs and truncated handshakes leave a live session intact and the listener's state unchanged")
    func refusalsAreIsolatedAndBounded() async throws {
        let server = try await listener(options: endOptions(names: ["client.test": ["127.0.0.1"], "liar.test": ["198.51.100.2"]], require: .dnsConfirmed))
        let clientNames = ["server.test": ["127.0.0.1"]]
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: endOptions(names: clientNames))
        let live = try await withTimeout(10) { try await accepted.value }
        try await settled(server, sessions: 1)
        let baseline = await server.stateCounts()

        for _ in 0..<20 {
            await #expect(throws: NBSError.self) {
                _ = try await NBS.open(localName: "liar.test", peerName: "server.test", port: server.port, options: endOptions(names: clientNames))
            }
        }
        // An IDENTITY whose signature is not over this session: refused as such.
        let handshake = ClientHandshake(sourceName: "client.test", destinationName: "server.test", port: UInt16(server.port))
        var bytes = ByteBuffer()
        NBSWire.writePreamble(into: &bytes)
        FrameEncoder.encode(.open(handshake.open), into: &bytes)
        FrameEncoder.encode(.identity(.init(publicKey: NBSIdentity().publicKey, signature: randomBytes(64))), into: &bytes)
        FrameEncoder.encode(.dataAck(.init(cumulativeAck: 0, window: 1 << 20)), into: &bytes)
        let badProof = try await RawPeer.exchange(port: server.port, send: Array(bytes.readableBytesView))
        #expect(badProof.frames.contains { if case .abort(let c) = $0 { c.reason == .authenticationFailed } else { false } })
        // Every prefix of an OPEN: the connection ends without anything staying behind.
        var open = ByteBuffer()
        NBSWire.writePreamble(into: &open)
        FrameEncoder.encode(.open(handshake.open), into: &open)
        for cut in stride(from: 1, to: open.readableBytes, by: 7) {
            let truncated = Array(open.readableBytesView.prefix(cut))
            _ = try await RawPeer.exchange(port: server.port, send: truncated, seconds: 0)
        }
        // An OPEN, then the connection closes before any verdict.
        _ = try await RawPeer.exchange(port: server.port, send: Array(open.readableBytesView), seconds: 0)

        try await settled(server, sessions: 1)
        let after = await server.stateCounts()
        #expect(after == baseline)
        #expect(await acceptStaysPending(server))

        let data = pattern(200_000, seed: 9)
        try await client.write(data)
        await client.finish()
        let (count, digest) = try await withTimeout(20) { try await drain(live) }
        #expect(count == 200_000)
        #expect(digest == sha256(data))
        try await live.close()
        try await client.close()
        await server.close()
    }

    @Test("idle connections beyond maxPendingHandshakes are refused at once; the table stays bounded and empties")
    func pendingHandshakesBounded() async throws {
        var options = endOptions(names: ["client.test": ["127.0.0.1"]])
        options.maxPendingHandshakes = 4
        let server = try await listener(options: options)
        var idle: [RawConnection] = []
        for _ in 0..<10 { idle.append(try await RawConnection(port: server.port)) }
        // The first four wait for their OPEN; the other six are refused with a reason.
        var refused = 0
        for connection in idle[4...] {
            let frames = try await connection.frames { _ in false }
            if frames.contains(where: { if case .abort(let c) = $0 { c.reason == .resourceLimit } else { false } }) { refused += 1 }
        }
        #expect(refused == 6)
        #expect(await server.stateCounts().pending == 4)
        for connection in idle { await connection.close() }
        try await settled(server)
        // Room again: a session opens.
        let accepted = Task { try await server.accept() }
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port,
                                        options: endOptions(names: ["server.test": ["127.0.0.1"]]))
        let session = try await withTimeout(10) { try await accepted.value }
        await client.abort()
        await session.abort()
        await server.close()
    }

    @Test("a listener with a slow resolver gives up after nameVerificationTimeout and admits the peer as claimed")
    func slowResolver() async throws {
        struct Slow: NameResolver {
            func resolve(_ name: String, port: Int) async throws -> [SocketAddress] {
                try await Task.sleep(for: .seconds(30))
                return []
            }
        }
        var options = NBSOptions()
        options.resolver = Slow()
        options.nameVerificationTimeout = .milliseconds(200)
        let server = try await listener(options: options)
        let accepted = Task { try await server.accept() }
        let started = ContinuousClock.now
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: loopbackOptions())
        let session = try await withTimeout(10) { try await accepted.value }
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(session.peerVerification == .claimed)
        await client.abort()
        await session.abort()
        await server.close()
    }
}

/// Counts lookups, so a test can tell whether the listener consulted DNS at all.
final class CountingResolver: NameResolver, @unchecked Sendable {
    private let inner: any NameResolver
    private let lock = NSLock()
    private var lookups = 0
    init(_ inner: any NameResolver) { self.inner = inner }
    var count: Int { lock.withLock { lookups } }
    func resolve(_ name: String, port: Int) async throws -> [SocketAddress] {
        lock.withLock { lookups += 1 }
        return try await inner.resolve(name, port: port)
    }
}

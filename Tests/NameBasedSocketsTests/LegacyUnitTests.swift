import NBSProtocol
import NIOCore
import Testing

@testable import NameBasedSockets

@Suite("Legacy peers: names, detection, cache")
struct LegacyUnitTests {
    @Test("IPv4, IPv6 and IPv4-mapped addresses get their reverse names")
    func reverseNames() throws {
        #expect(ReverseName.of(try SocketAddress(ipAddress: "192.0.2.1", port: 80)) == "1.2.0.192.in-addr.arpa")
        #expect(ReverseName.of(try SocketAddress(ipAddress: "203.0.113.254", port: 0)) == "254.113.0.203.in-addr.arpa")
        let zeros = String(repeating: "0.", count: 16)
        #expect(ReverseName.of(try SocketAddress(ipAddress: "2001:db8::567:89ab", port: 1)) == "b.a.9.8.7.6.5.0.\(zeros)8.b.d.0.1.0.0.2.ip6.arpa")
        // The example of RFC 3596 §2.5, as a string only.
        #expect(ReverseName.of(try SocketAddress(ipAddress: "4321:0:1:2:3:4:567:89ab", port: 1))
            == "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa")
        #expect(ReverseName.of(try SocketAddress(ipAddress: "::ffff:198.51.100.7", port: 9)) == "7.100.51.198.in-addr.arpa")
        // Not mapped: only ::ffff:0:0/96 is IPv4.
        #expect(ReverseName.of(try SocketAddress(ipAddress: "::1", port: 9))?.hasSuffix(".ip6.arpa") == true)
        #expect(ReverseName.of(packed: [1, 2, 3]) == nil)
        #expect(ReverseName.of(try SocketAddress(unixDomainSocketPath: "/tmp/x")) == nil)
    }

    @Test("a listener tells NBS clients from legacy ones by the first bytes or silence")
    func listenerClassification() {
        let magic = NBSWire.magic
        #expect(LegacyDetection.classify([], side: .listener) == .undecided)
        #expect(LegacyDetection.classify(magic.prefix(2), side: .listener) == .undecided)
        #expect(LegacyDetection.classify(magic, side: .listener) == .nbs)
        #expect(LegacyDetection.classify(magic + [1, 0, 1], side: .listener) == .nbs)
        #expect(LegacyDetection.classify(Array("GET / HTTP/1.1\r\n".utf8), side: .listener) == .legacy)
        // One differing byte settles it, even before the magic is complete.
        #expect(LegacyDetection.classify([0x4E, 0x41], side: .listener) == .legacy)
        #expect(LegacyDetection.classify(Array("N".utf8), side: .listener) == .undecided)
        // Silent (a client waiting for a banner) or ended before the magic: legacy.
        #expect(LegacyDetection.classify([], side: .listener, silentTooLong: true) == .legacy)
        #expect(LegacyDetection.classify(magic.prefix(3), side: .listener, silentTooLong: true) == .legacy)
        #expect(LegacyDetection.classify(magic.prefix(3), side: .listener, inputEnded: true) == .legacy)
        #expect(LegacyDetection.classify(magic, side: .listener, silentTooLong: true) == .nbs)
    }

    @Test("an opener tells NBS servers from legacy and echo servers")
    func openerClassification() {
        var preamble = ByteBuffer()
        NBSWire.writePreamble(into: &preamble)
        let p = Array(preamble.readableBytesView)
        #expect(LegacyDetection.classify(p, side: .opener) == .undecided)
        #expect(LegacyDetection.classify(p + [FrameType.accept.rawValue], side: .opener) == .nbs)
        #expect(LegacyDetection.classify(p + [FrameType.abort.rawValue, 0], side: .opener) == .nbs)
        #expect(LegacyDetection.classify(p + [FrameType.open.rawValue], side: .opener) == .echo)
        #expect(LegacyDetection.classify(Array("220 mail.example ESMTP\r\n".utf8), side: .opener) == .legacy)
        #expect(LegacyDetection.classify(Array("SSH-2.0-x\r\n".utf8), side: .opener) == .legacy)
        #expect(LegacyDetection.classify([], side: .opener, inputEnded: true) == .legacy)
        #expect(LegacyDetection.classify([], side: .opener, silentTooLong: true) == .legacy)
        #expect(LegacyDetection.classify([], side: .opener) == .undecided)
    }

    @Test("the legacy peer cache remembers name and port until expiry, within its capacity")
    func cache() {
        let cache = LegacyPeerCache(lifetime: .seconds(600), capacity: 3)
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        #expect(!cache.isLegacy("legacy.test", port: 80, now: t0))
        cache.remember("Legacy.Test.", port: 80, now: t0)
        #expect(cache.isLegacy("legacy.test", port: 80, now: t0 + .seconds(599)))
        #expect(!cache.isLegacy("legacy.test", port: 81, now: t0))
        #expect(!cache.isLegacy("other.test", port: 80, now: t0))
        #expect(!cache.isLegacy("legacy.test", port: 80, now: t0 + .seconds(600)))
        #expect(cache.count == 0)  // the expired entry went when it was looked up

        // Full: the entry closest to expiry makes room.
        cache.remember("a.test", port: 1, now: t0)
        cache.remember("b.test", port: 1, now: t0 + .seconds(1))
        cache.remember("c.test", port: 1, now: t0 + .seconds(2))
        cache.remember("d.test", port: 1, now: t0 + .seconds(3))
        #expect(cache.count == 3)
        #expect(!cache.isLegacy("a.test", port: 1, now: t0 + .seconds(3)))
        #expect(cache.isLegacy("d.test", port: 1, now: t0 + .seconds(3)))
        // Remembering again renews.
        cache.remember("b.test", port: 1, now: t0 + .seconds(500))
        #expect(cache.isLegacy("b.test", port: 1, now: t0 + .seconds(1000)))
        #expect(!cache.isLegacy("c.test", port: 1, now: t0 + .seconds(1000)))
        cache.forget("b.test", port: 1)
        #expect(!cache.isLegacy("b.test", port: 1, now: t0 + .seconds(501)))
    }
}

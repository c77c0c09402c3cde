import Testing
@testable import NBSNetlink
#if canImport(Glibc)
import Glibc
#endif

/// Whatever the bytes, the parser returns or throws a typed error; it never traps or reads outside
/// the buffer (run under ASan with `swift test --sanitize=address` to check the latter).
@Suite struct MalformedInputTests {
    /// Offsets where messages start and end inside a well-formed datagram.
    private func boundaries(_ bytes: [UInt8]) throws -> Set<Int> {
        var result: Set<Int> = [0]
        var offset = 0
        for (header, _) in try parseNetlinkMessagesWithHeaders(bytes) {
            offset += (Int(header.length) + 3) & ~3
            result.insert(min(offset, bytes.count))
        }
        return result
    }

    @Test func emptyBufferHasNoMessages() throws {
        #expect(try parseNetlinkMessages([]).isEmpty)
    }

    @Test func everyPrefixOfEveryCapturedDatagram() throws {
        for (step, bytes) in Fixtures.allDatagrams {
            let cuts = try boundaries(bytes)
            for length in 0..<bytes.count {
                let prefix = Array(bytes.prefix(length))
                if cuts.contains(length) {
                    // A cut between messages is a shorter but valid datagram.
                    #expect(throws: Never.self, "\(step) at \(length)") { try parseNetlinkMessages(prefix) }
                } else {
                    do {
                        _ = try parseNetlinkMessages(prefix)
                        Issue.record("\(step): prefix of \(length) bytes parsed without error")
                    } catch .truncatedHeader, .invalidMessageLength {
                        // expected
                    } catch {
                        Issue.record("\(step): prefix of \(length) bytes: unexpected \(error)")
                    }
                }
            }
        }
    }

    @Test(arguments: [UInt32(0), 1, 15, 0xFFFF_FFFF])
    func impossibleMessageLengthsThrow(length: UInt32) throws {
        var bytes = Fixtures.datagrams("addr add 192.0.2.1/24 dev d0")[0]
        withUnsafeBytes(of: length) { bytes.replaceSubrange(0..<4, with: $0) }
        #expect(throws: NetlinkParseError.invalidMessageLength(offset: 0, length: length, available: bytes.count)) {
            try parseNetlinkMessages(bytes)
        }
    }

    @Test func lengthPastTheEndOfALaterMessageThrows() throws {
        let first = Build.newLink(index: 2, name: "d0")
        var second = Build.newLink(index: 3, name: "d1")
        withUnsafeBytes(of: UInt32(second.count + 8)) { second.replaceSubrange(0..<4, with: $0) }
        #expect(throws: NetlinkParseError.invalidMessageLength(
            offset: first.count, length: UInt32(second.count + 8), available: second.count)) {
            try parseNetlinkMessages(first + second)
        }
    }

    @Test func trailingBytesShorterThanAHeaderThrow() throws {
        let bytes = Build.newLink(index: 2, name: "d0") + [1, 2, 3, 4]
        #expect(throws: NetlinkParseError.truncatedHeader(offset: bytes.count - 4, available: 4)) {
            try parseNetlinkMessages(bytes)
        }
    }

    @Test func messageTooShortForItsFixedHeaderIsMalformed() throws {
        let address = Build.message(type: Build.RTM_NEWADDR, payload: [2, 24])
        let link = Build.message(type: Build.RTM_DELLINK, payload: [0, 0, 1, 0, 2, 0, 0, 0])
        let error = Build.message(type: 2, payload: [])
        #expect(try parseNetlinkMessages(address) == [
            .malformed(type: 20, .truncatedPayload(messageType: 20, needed: 8, available: 4))])
        #expect(try parseNetlinkMessages(link) == [
            .malformed(type: 17, .truncatedPayload(messageType: 17, needed: 16, available: 8))])
        #expect(try parseNetlinkMessages(error) == [
            .malformed(type: 2, .truncatedPayload(messageType: 2, needed: 4, available: 0))])
    }

    @Test(arguments: [UInt16(0), 1, 3, 9, 0x7FFF, 0xFFFF])
    func attributeLengthThatLiesIsMalformed(nlaLength: UInt16) throws {
        var bytes = Build.newAddress([192, 0, 2, 1])
        let firstAttribute = 16 + 8
        withUnsafeBytes(of: nlaLength) { bytes.replaceSubrange(firstAttribute..<firstAttribute + 2, with: $0) }
        let parsed = try parseNetlinkMessages(bytes)
        guard case .malformed(20, let error) = parsed.first, parsed.count == 1 else {
            Issue.record("nla_len \(nlaLength): \(parsed)")
            return
        }
        switch error {
        case .malformedAttribute, .invalidAttributeLength: break
        default: Issue.record("nla_len \(nlaLength): \(error)")
        }
    }

    @Test func attributeRunningPastTheCapturedMessageIsMalformed() throws {
        var bytes = Fixtures.datagrams("addr add 192.0.2.1/24 dev d0")[0]
        // The last attribute claims 64 more bytes than the message holds.
        var offset = 16 + 8
        var last = offset
        while offset < bytes.count {
            last = offset
            let length = Int(bytes[offset]) | Int(bytes[offset + 1]) << 8
            offset += (length + 3) & ~3
        }
        let claimed = UInt16(bytes.count - last + 64)
        withUnsafeBytes(of: claimed) { bytes.replaceSubrange(last..<last + 2, with: $0) }
        #expect(try parseNetlinkMessages(bytes) == [
            .malformed(type: 20, .malformedAttribute(messageType: 20, offset: last))])
    }

    @Test func wrongSizeAddressPayloads() throws {
        let v4With16 = Build.newAddress([UInt8](repeating: 1, count: 16), family: Build.AF_INET)
        let v6With4 = Build.newAddress([32, 1, 13, 184], family: Build.AF_INET6)
        let v4With5 = Build.newAddress([192, 0, 2, 1, 9], family: Build.AF_INET)
        #expect(try parseNetlinkMessages(v4With16) == [
            .malformed(type: 20, .invalidAttributeLength(messageType: 20, attribute: 2, length: 16))])
        #expect(try parseNetlinkMessages(v6With4) == [
            .malformed(type: 20, .invalidAttributeLength(messageType: 20, attribute: 2, length: 4))])
        #expect(try parseNetlinkMessages(v4With5) == [
            .malformed(type: 20, .invalidAttributeLength(messageType: 20, attribute: 2, length: 5))])
        let shortFlags = Build.newAddress([192, 0, 2, 1], extra: Build.attribute(Build.IFA_FLAGS, [0x80, 0]))
        #expect(try parseNetlinkMessages(shortFlags) == [
            .malformed(type: 20, .invalidAttributeLength(messageType: 20, attribute: 8, length: 2))])
        let wideOperState = Build.message(type: Build.RTM_NEWLINK, payload: Build.ifinfomsg(index: 2, flags: 0x1)
            + Build.attribute(Build.IFLA_OPERSTATE, [6, 0, 0, 0]))
        #expect(try parseNetlinkMessages(wideOperState) == [
            .malformed(type: 16, .invalidAttributeLength(messageType: 16, attribute: 16, length: 4))])
    }

    @Test func addressWithoutAnAddressIsMalformed() throws {
        let bytes = Build.message(type: Build.RTM_DELADDR, payload: Build.ifaddrmsg(family: Build.AF_INET, prefixLength: 24, index: 3)
            + Build.attribute(Build.IFA_LABEL, Array("d0\0".utf8)))
        #expect(try parseNetlinkMessages(bytes) == [.malformed(type: 21, .missingAddress(messageType: 21))])
    }

    @Test func peerAddressIsNotMistakenForTheLocalOne() throws {
        // Point-to-point: IFA_LOCAL is ours, IFA_ADDRESS is the far end.
        let bytes = Build.message(type: Build.RTM_NEWADDR, payload: Build.ifaddrmsg(family: Build.AF_INET, prefixLength: 32, index: 4)
            + Build.attribute(Build.IFA_ADDRESS, [203, 0, 113, 9]) + Build.attribute(Build.IFA_LOCAL, [203, 0, 113, 1]))
        guard case .newAddress(let a) = try parseNetlinkMessages(bytes).first else {
            Issue.record("not parsed")
            return
        }
        #expect(a.address == "203.0.113.1")
    }

    @Test(arguments: [UInt16(1), 24, 25, 0x1234, 0xFFFF])
    func unknownMessageTypesAreOther(type: UInt16) throws {
        let bytes = Build.message(type: type, payload: [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(try parseNetlinkMessages(bytes) == [.other(type: type)])
    }

    @Test func otherFamiliesAreOther() throws {
        let mpls = Build.message(type: Build.RTM_NEWADDR, payload: Build.ifaddrmsg(family: 28, prefixLength: 20, index: 2)
            + Build.attribute(Build.IFA_ADDRESS, [0, 1, 2, 3]))
        let bridge = Build.message(type: Build.RTM_DELLINK, payload: Build.ifinfomsg(family: 7, index: 2, flags: 0))
        #expect(try parseNetlinkMessages(mpls + bridge) == [.other(type: 20), .other(type: 17)])
    }

    @Test func malformedMessageDoesNotHideItsNeighbours() throws {
        let good = Build.newAddress([192, 0, 2, 1])
        let bad = Build.newAddress([192, 0, 2, 1, 9])
        let parsed = try parseNetlinkMessages(good + bad + good)
        #expect(parsed.count == 3)
        #expect(parsed[0] == parsed[2])
        if case .malformed = parsed[1] {} else { Issue.record("middle message: \(parsed[1])") }
    }

    @Test func unterminatedStringsAreCutAtTheAttributeEnd() throws {
        let bytes = Build.message(type: Build.RTM_NEWLINK, payload: Build.ifinfomsg(index: 7, flags: 0x11043)
            + Build.attribute(Build.IFLA_IFNAME, Array("abcd".utf8)))
        guard case .newLink(let link) = try parseNetlinkMessages(bytes).first else {
            Issue.record("not parsed")
            return
        }
        #expect(link.name == "abcd")
        #expect(link.isUp, "no IFLA_OPERSTATE: flags alone decide")
    }

    @Test func doneCarryingAnErrorIsAnError() throws {
        let failed = Build.message(type: 3, payload: Build.bytes(Int32(-16)))
        let fine = Build.message(type: 3, payload: Build.bytes(Int32(0)))
        let bare = Build.message(type: 3, payload: [])
        let ack = Build.message(type: 2, payload: Build.bytes(Int32(0)) + [UInt8](repeating: 0, count: 16))
        #expect(try parseNetlinkMessages(failed + fine + bare + ack) == [.error(errno: 16), .done, .done, .ack])
    }

    @Test func unalignedFinalLengthIsTolerated() throws {
        // nlmsg_len 17 on the last message: libmnl aligns it to 20 before comparing, which would
        // look past a 17-byte buffer if the parser did not pad its copy.
        let bytes = Build.bytes(UInt32(17)) + Build.bytes(UInt16(0x4242)) + [UInt8](repeating: 0, count: 10) + [7]
        #expect(try parseNetlinkMessages(bytes) == [.other(type: 0x4242)])
    }

    @Test func randomCorruptionNeverCrashes() {
        var rng = SplitMix64(seed: 0x4E42_5321)
        let corpus = Fixtures.allDatagrams.map(\.bytes)
        var thrown = 0
        var malformed = 0
        // NBS_FUZZ_ITERATIONS=1000000 for a longer run.
        let iterations = getenv("NBS_FUZZ_ITERATIONS").flatMap { Int(String(cString: $0)) } ?? 20_000
        for _ in 0..<iterations {
            var bytes = corpus[Int(rng.next() % UInt64(corpus.count))]
            for _ in 0..<(1 + rng.next() % 4) {
                let index = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 3 {
                case 0: bytes[index] = UInt8(truncatingIfNeeded: rng.next())
                case 1: bytes[index] ^= 1 << UInt8(rng.next() % 8)
                default: bytes.removeSubrange(index...)
                }
                if bytes.isEmpty { break }
            }
            do {
                let messages = try parseNetlinkMessages(bytes)
                malformed += messages.filter { if case .malformed = $0 { true } else { false } }.count
            } catch {
                thrown += 1
            }
        }
        // Both kinds of damage were actually exercised.
        #expect(thrown > 100)
        #expect(malformed > 100)
    }
}

struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

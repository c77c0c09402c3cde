import Crypto
import NIOCore
import Testing

@testable import NBSProtocol

@Suite("Identity keys, self-certifying names and proofs of possession")
struct IdentityTests {
    @Test("base32 matches RFC 4648's test vectors, lowercase and unpadded")
    func base32Vectors() {
        let vectors: [(String, String)] = [("", ""), ("f", "my"), ("fo", "mzxq"), ("foo", "mzxw6"), ("foob", "mzxw6yq"),
                                           ("fooba", "mzxw6ytb"), ("foobar", "mzxw6ytboi")]
        for (input, output) in vectors { #expect(SelfCertifyingName.base32(Array(input.utf8)) == output) }
    }

    @Test("base64 round-trips and refuses non-canonical text")
    func base64() {
        for length in 0..<70 {
            let bytes = randomBytes(length)
            #expect(Base64.decode(Base64.encode(bytes)) == bytes)
        }
        #expect(Base64.encode(Array("foobar".utf8)) == "Zm9vYmFy")
        #expect(Base64.encode(Array("fo".utf8)) == "Zm8=")
        for bad in ["Zm8", "Zm=8", "Z===", "Zm9v YmFy", "Zm9*", "Zm9=", "Zm8=Zm8="] { #expect(Base64.decode(bad) == nil, "\(bad)") }
    }

    @Test("the self-certifying name is the base32 of the key's hash under nbs-key.arpa, and only that key's")
    func selfCertifyingName() throws {
        let identity = NBSIdentity()
        let name = identity.selfCertifyingName
        let digest = Array(SHA256.hash(data: identity.publicKey))
        #expect(name == SelfCertifyingName.base32(Array(digest.prefix(20))) + ".nbs-key.arpa")
        #expect(name.count == 32 + 1 + "nbs-key.arpa".count)
        #expect(SelfCertifyingName.isSelfCertifying(name))
        #expect(SelfCertifyingName.isSelfCertifying(name.uppercased() + "."))
        #expect(SelfCertifyingName.matches(name.uppercased(), publicKey: identity.publicKey))
        #expect(!SelfCertifyingName.matches(name, publicKey: NBSIdentity().publicKey))
        #expect(!SelfCertifyingName.isSelfCertifying("client.example"))
        #expect(!SelfCertifyingName.isSelfCertifying("nbs-key.arpa"))
        #expect(!SelfCertifyingName.isSelfCertifying(String(name.dropFirst()))) // 31-character label
        #expect(!SelfCertifyingName.isSelfCertifying("0" + name.dropFirst()))  // '0' is not base32
        #expect(!SelfCertifyingName.isSelfCertifying("x." + name))
        // Loading the same private key gives the same identity.
        let again = try NBSIdentity(privateKey: identity.privateKey)
        #expect(again == identity)
        #expect(throws: IdentityError.self) { try NBSIdentity(privateKey: [1, 2, 3]) }
    }

    /// Found by the handshake fuzz target (Fuzz/, 2026-11-25): an IDENTITY with an all-zero key and
    /// an all-zero signature verified. Small-order keys have no private key; they prove nothing.
    @Test("small-order keys and signatures never verify, whatever the session")
    func smallOrderKeysRefused() throws {
        let zeroSignature = [UInt8](repeating: 0, count: NBSWire.signatureLength)
        var verified = 0
        for _ in 0..<64 {
            let f = try HandshakeFixture()
            let transcript = HandshakeTranscript(open: f.client.open, accept: f.accept)
            for key in SmallOrderPoint.encodings {
                for signature in [zeroSignature, key + [UInt8](repeating: 0, count: 32)] {
                    for role in [SessionKeys.Role.client, .server] where transcript.verify(.init(publicKey: key, signature: signature), by: role) != nil {
                        verified += 1
                    }
                }
            }
            // A genuine proof still verifies.
            let identity = NBSIdentity()
            #expect(transcript.verify(identity.prove(transcript, as: .server), by: .server) == identity.publicKey)
        }
        #expect(verified == 0)
        // The sign bit does not hide a small-order point.
        var signed = SmallOrderPoint.encodings[2]
        signed[31] |= 0x80
        #expect(SmallOrderPoint.matches(signed))
        #expect(!SmallOrderPoint.matches(NBSIdentity().publicKey))
    }

    @Test("a proof verifies for its session and role only")
    func proofBinding() throws {
        let identity = NBSIdentity()
        let f = try HandshakeFixture()
        let transcript = HandshakeTranscript(open: f.client.open, accept: f.accept)
        let proof = identity.prove(transcript, as: .client)
        #expect(proof.publicKey == identity.publicKey)
        #expect(proof.signature.count == NBSWire.signatureLength)
        #expect(transcript.verify(proof, by: .client) == identity.publicKey)
        // Reflected as the other role.
        #expect(transcript.verify(proof, by: .server) == nil)
        // Another key claimed with this signature.
        #expect(transcript.verify(.init(publicKey: NBSIdentity().publicKey, signature: proof.signature), by: .client) == nil)
        // A flipped bit in the signature.
        var flipped = proof
        flipped.signature[10] ^= 1
        #expect(transcript.verify(flipped, by: .client) == nil)
        // Truncated fields.
        #expect(transcript.verify(.init(publicKey: proof.publicKey, signature: Array(proof.signature.prefix(63))), by: .client) == nil)
        #expect(transcript.verify(.init(publicKey: Array(proof.publicKey.prefix(31)), signature: proof.signature), by: .client) == nil)
    }

    @Test("a proof recorded in one session is refused in another, even between the same names")
    func proofReplay() throws {
        let identity = NBSIdentity()
        let first = try HandshakeFixture()
        let second = try HandshakeFixture()
        let recorded = identity.prove(HandshakeTranscript(open: first.client.open, accept: first.accept), as: .client)
        #expect(HandshakeTranscript(open: second.client.open, accept: second.accept).verify(recorded, by: .client) == nil)
    }

    @Test("every transcript field is covered by the signature")
    func transcriptFields() throws {
        let identity = NBSIdentity()
        let f = try HandshakeFixture()
        let transcript = HandshakeTranscript(open: f.client.open, accept: f.accept)
        let proof = identity.prove(transcript, as: .server)
        var variants: [HandshakeTranscript] = []
        var t = transcript
        t.open.publicKey[0] ^= 1; variants.append(t); t = transcript
        t.serverPublicKey[0] ^= 1; variants.append(t); t = transcript
        t.open.nonce[0] ^= 1; variants.append(t); t = transcript
        t.serverNonce[0] ^= 1; variants.append(t); t = transcript
        t.open.sourceName = "mallory.example"; variants.append(t); t = transcript
        t.open.destinationName = "other.example"; variants.append(t); t = transcript
        t.serverName = "other.example"; variants.append(t); t = transcript
        t.open.port &+= 1; variants.append(t); t = transcript
        t.token &+= 1; variants.append(t)
        for variant in variants { #expect(variant.verify(proof, by: .server) == nil) }
        #expect(transcript.verify(proof, by: .server) != nil)
    }

    @Test("a man in the middle who substitutes X25519 keys cannot relay an identity proof")
    func proofDefeatsMITM() throws {
        let listener = NBSIdentity()
        // Opener → Mallory: the real OPEN. Mallory → listener: an OPEN with Mallory's key.
        let opener = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 1)
        let mallory = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 1)
        var relayedOpen = opener.open
        relayedOpen.publicKey = mallory.open.publicKey
        let (acceptToMallory, _) = try ServerHandshake.accept(relayedOpen, serverName: "server.example", token: 7, receiveWindow: 1)
        let proof = listener.prove(HandshakeTranscript(open: relayedOpen, accept: acceptToMallory), as: .server)
        // Mallory forwards the proof with her own ACCEPT to the opener: the opener's transcript has
        // its own X25519 key and Mallory's, so the signature does not verify.
        let (acceptToOpener, _) = try ServerHandshake.accept(opener.open, serverName: "server.example", token: 7, receiveWindow: 1)
        #expect(HandshakeTranscript(open: opener.open, accept: acceptToOpener).verify(proof, by: .server) == nil)
    }

    @Test("IDENTITY survives the wire, is skippable by older peers, and has an exact size")
    func identityFrame() throws {
        let f = try HandshakeFixture()
        let proof = NBSIdentity().prove(HandshakeTranscript(open: f.client.open, accept: f.accept), as: .client)
        let bytes = encoded(.identity(proof))
        #expect(bytes.getInteger(at: 1, as: UInt8.self) == NBSWire.ignorableFlag)
        #expect(try overTheWire(.identity(proof)) == .identity(proof))
        // Truncated and padded payloads.
        var decoder = FrameDecoder(expectPreamble: false)
        var short = rawFrame(type: FrameType.identity.rawValue, flags: 0x80, payload: Array(proof.publicKey + proof.signature.prefix(63)))
        #expect(throws: FrameDecodingError.malformed(.identity, "truncated")) { _ = try decoder.next(from: &short) }
        decoder = FrameDecoder(expectPreamble: false)
        // One byte over the fixed size is refused from the header alone.
        var long = rawFrame(type: FrameType.identity.rawValue, flags: 0x80, payload: proof.publicKey + proof.signature + [0])
        #expect(throws: FrameDecodingError.frameTooLarge(type: FrameType.identity.rawValue, length: 97, limit: 96)) { _ = try decoder.next(from: &long) }
        // A header alone claiming too much is refused before its payload arrives.
        decoder = FrameDecoder(expectPreamble: false)
        var header = rawFrame(type: FrameType.identity.rawValue, flags: 0x80, payload: [], length: 1000)
        #expect(throws: FrameDecodingError.self) { _ = try decoder.next(from: &header) }
    }

    @Test("a listener's IDENTITY may precede ACCEPT; anywhere else before the handshake it is a violation")
    func identityInStateMachine() throws {
        var opener = SubflowStateMachine.openerSide(joining: false)
        let proof = Frame.Identity(publicKey: randomBytes(32), signature: randomBytes(64))
        #expect(opener.receive(.identity(proof)) == .handshake(.identity(proof)))
        var listener = SubflowStateMachine.listenerSide()
        guard case .protocolViolation = listener.receive(.identity(proof)) else {
            Issue.record("IDENTITY before OPEN accepted")
            return
        }
        var joining = SubflowStateMachine.openerSide(joining: true)
        guard case .protocolViolation = joining.receive(.identity(proof)) else {
            Issue.record("IDENTITY before JOIN_ACK accepted")
            return
        }
    }
}

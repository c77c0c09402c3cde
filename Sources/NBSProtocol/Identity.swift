import Crypto
import NIOCore

/// A host's long-term Ed25519 identity. It proves possession in the handshake (IDENTITY frame)
/// and, for hosts without a DNS name, gives the self-certifying name derived from its public key.
public struct NBSIdentity: Sendable, Equatable {
    /// Raw bytes: the key type is not Sendable in swift-crypto 3.
    private let privateKeyBytes: [UInt8]
    public let publicKey: [UInt8]

    public init() {
        let key = Curve25519.Signing.PrivateKey()
        privateKeyBytes = Array(key.rawRepresentation)
        publicKey = Array(key.publicKey.rawRepresentation)
    }

    public init(privateKey: [UInt8]) throws(IdentityError) {
        guard privateKey.count == NBSWire.identityKeyLength,
            let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: privateKey)
        else { throw .invalidKey("an Ed25519 private key is \(NBSWire.identityKeyLength) bytes, got \(privateKey.count)") }
        privateKeyBytes = privateKey
        publicKey = Array(key.publicKey.rawRepresentation)
    }

    /// Only for writing the key file; nothing else needs the private half.
    public var privateKey: [UInt8] { privateKeyBytes }

    public var selfCertifyingName: String { SelfCertifyingName.name(for: publicKey) }

    /// The IDENTITY frame proving this key to the peer of the session `transcript` describes.
    public func prove(_ transcript: HandshakeTranscript, as role: SessionKeys.Role) -> Frame.Identity {
        let key = try! Curve25519.Signing.PrivateKey(rawRepresentation: privateKeyBytes)
        let signature = try! key.signature(for: transcript.signedBytes(by: role))
        return Frame.Identity(publicKey: publicKey, signature: Array(signature))
    }
}

public enum IdentityError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidKey(String)
    case keyFile(path: String, reason: String)

    public var description: String {
        switch self {
        case .invalidKey(let why): "invalid identity key: \(why)"
        case .keyFile(let path, let reason): "identity key file \(path): \(reason)"
        }
    }
}

/// Names that are their own proof: the label is a hash of the public key, so only the holder of
/// the private key can prove it, with no registry involved. Format (docs/PROTOCOL.md):
/// base32(SHA-256(public key)[0..<20]), lowercase, no padding (32 characters), then `.nbs-key.arpa`.
public enum SelfCertifyingName {
    public static let suffix = "nbs-key.arpa"
    static let hashBytes = 20
    static let labelLength = 32

    public static func name(for publicKey: [UInt8]) -> String {
        let digest = Array(SHA256.hash(data: publicKey))
        return base32(Array(digest.prefix(hashBytes))) + "." + suffix
    }

    /// Whether `name` has the shape of a self-certifying name (any key).
    public static func isSelfCertifying(_ name: String) -> Bool {
        let n = canonicalName(name)
        guard n.hasSuffix("." + suffix) else { return false }
        let label = n.dropLast(suffix.count + 1)
        return label.count == labelLength && label.allSatisfy { base32Alphabet.contains($0) }
    }

    /// Whether `name` is the self-certifying name of `publicKey`.
    public static func matches(_ name: String, publicKey: [UInt8]) -> Bool {
        canonicalName(name) == self.name(for: publicKey)
    }

    static let base32Alphabet = Array("abcdefghijklmnopqrstuvwxyz234567")

    /// RFC 4648 base32, lowercase (DNS labels are case-insensitive), without padding.
    static func base32(_ bytes: [UInt8]) -> String {
        var out = ""
        var buffer: UInt32 = 0
        var bits = 0
        for byte in bytes {
            buffer = (buffer << 8) | UInt32(byte)
            bits += 8
            while bits >= 5 {
                out.append(base32Alphabet[Int((buffer >> UInt32(bits - 5)) & 31)])
                bits -= 5
            }
        }
        if bits > 0 { out.append(base32Alphabet[Int((buffer << UInt32(5 - bits)) & 31)]) }
        return out
    }
}

/// What an identity signature covers: everything both sides agreed in OPEN/ACCEPT. The ephemeral
/// X25519 keys and both nonces are fresh per session, so a signature cannot be replayed into
/// another session, and a man in the middle who substituted either X25519 key makes the two ends
/// see different transcripts, so his relayed signature fails.
public struct HandshakeTranscript: Sendable, Equatable {
    public var open: Frame.Open
    public var serverName: String
    public var token: UInt64
    public var serverPublicKey: [UInt8]
    public var serverNonce: [UInt8]

    public init(open: Frame.Open, accept: Frame.Accept) {
        self.open = open
        serverName = accept.serverName
        token = accept.token
        serverPublicKey = accept.publicKey
        serverNonce = accept.nonce
    }

    /// The role is part of the signed bytes, so a listener's proof cannot be reflected back to it
    /// as the opener's.
    public func signedBytes(by role: SessionKeys.Role) -> [UInt8] {
        var b = ByteBuffer()
        b.writeString(role == .client ? "NBS-1 identity opener" : "NBS-1 identity listener")
        b.writeInteger(UInt8(0))
        b.writeBytes(open.publicKey)
        b.writeBytes(serverPublicKey)
        b.writeBytes(open.nonce)
        b.writeBytes(serverNonce)
        for name in [open.sourceName, open.destinationName, serverName] {
            let bytes = Array(truncatedUTF8(name, maxBytes: NBSWire.maxNameLength).utf8)
            b.writeInteger(UInt8(bytes.count))
            b.writeBytes(bytes)
        }
        b.writeInteger(open.port)
        b.writeInteger(token)
        return Array(b.readableBytesView)
    }

    /// The public key `proof` proves for `role` in this session, or nil when the signature does not
    /// verify (wrong key, another session's transcript, another role).
    public func verify(_ proof: Frame.Identity, by role: SessionKeys.Role) -> [UInt8]? {
        guard proof.publicKey.count == NBSWire.identityKeyLength, proof.signature.count == NBSWire.signatureLength,
            !SmallOrderPoint.matches(proof.publicKey), !SmallOrderPoint.matches(Array(proof.signature.prefix(32))),
            let key = try? Curve25519.Signing.PublicKey(rawRepresentation: proof.publicKey),
            key.isValidSignature(proof.signature, for: signedBytes(by: role))
        else { return nil }
        return proof.publicKey
    }
}

/// RFC 4648 base64 with padding, for keys in files and on command lines (NBSProtocol does not
/// depend on Foundation).
public enum Base64 {
    static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    public static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let chunk = Array(bytes[i..<min(i + 3, bytes.count)])
            let n = (UInt32(chunk[0]) << 16) | (UInt32(chunk.count > 1 ? chunk[1] : 0) << 8) | UInt32(chunk.count > 2 ? chunk[2] : 0)
            for j in 0..<4 {
                out.append(j <= chunk.count ? alphabet[Int((n >> UInt32(18 - 6 * j)) & 63)] : UInt8(ascii: "="))
            }
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// nil for anything that is not canonical padded base64.
    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 4 == 0 else { return nil }
        var out: [UInt8] = []
        var i = 0
        while i < chars.count {
            var n: UInt32 = 0
            var padding = 0
            for j in 0..<4 {
                let c = chars[i + j]
                if c == UInt8(ascii: "=") {
                    // Padding only at the end of the last group, at most two.
                    guard i + 4 == chars.count, j >= 2 else { return nil }
                    padding += 1
                    n <<= 6
                } else {
                    guard padding == 0, let v = alphabet.firstIndex(of: c) else { return nil }
                    n = (n << 6) | UInt32(v)
                }
            }
            out.append(UInt8(n >> 16))
            if padding < 2 { out.append(UInt8((n >> 8) & 0xFF)) }
            if padding < 1 { out.append(UInt8(n & 0xFF)) }
            i += 4
        }
        guard encode(out) == text else { return nil }
        return out
    }
}

/// Ed25519 points of small order (and their non-canonical encodings), as libsodium blocks them.
/// Found by fuzzing: BoringSSL's verification, which swift-crypto uses, accepts an all-zero public
/// key with an all-zero signature for some messages, since [8]A and R are then the identity. Such
/// a "key" has no private key, so a proof with it proves nothing; it, or such an R, is refused.
enum SmallOrderPoint {
    static let encodings: [[UInt8]] = [
        [UInt8](repeating: 0, count: 32),
        [1] + [UInt8](repeating: 0, count: 31),
        [0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98, 0xf0,
         0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53, 0xfc, 0x05],
        [0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67, 0x0f,
         0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac, 0x03, 0x7a],
        [0xec] + [UInt8](repeating: 0xff, count: 30) + [0x7f],
        [0xed] + [UInt8](repeating: 0xff, count: 30) + [0x7f],
        [0xee] + [UInt8](repeating: 0xff, count: 30) + [0x7f],
    ]

    /// Compared without the sign bit (the top bit of the last byte), which does not change the order.
    static func matches(_ point: [UInt8]) -> Bool {
        guard point.count == 32 else { return false }
        return encodings.contains { encoding in
            zip(point.prefix(31), encoding.prefix(31)).allSatisfy { $0 == $1 } && point[31] & 0x7f == encoding[31] & 0x7f
        }
    }
}

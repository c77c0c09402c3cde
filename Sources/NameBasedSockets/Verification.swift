import NBSProtocol
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// Identity types are part of NBSOptions' API; applications should not need to import NBSProtocol.
public typealias NBSIdentity = NBSProtocol.NBSIdentity
public typealias IdentityError = NBSProtocol.IdentityError
public typealias SelfCertifyingName = NBSProtocol.SelfCertifyingName
public typealias Base64 = NBSProtocol.Base64

/// How far the peer's name was verified (DESIGN.md, Security; docs/SECURITY.md defines each
/// level on each side). Ordered: a requirement is met by its level or a higher one.
public enum PeerVerification: String, Sendable, Codable, Comparable, CaseIterable {
    /// The peer said so.
    case claimed
    /// The name, resolved forward, includes the address the first subflow came from (listener), or
    /// the opener dialled the name through its resolver rather than as a literal address.
    case dnsConfirmed
    /// The peer proved possession of the key pinned for the name, or of the key its
    /// self-certifying name is derived from.
    case keyVerified

    private var rank: Int {
        switch self {
        case .claimed: 0
        case .dnsConfirmed: 1
        case .keyVerified: 2
        }
    }

    public static func < (a: Self, b: Self) -> Bool { a.rank < b.rank }
}

/// What is known about a peer's name when the handshake ends: the input of `NameVerifier.evaluate`.
public struct PeerEvidence: Sendable, Equatable {
    /// The name the peer claims (listener: OPEN's source name; opener: the name it dialled).
    public var claimedName: String
    /// The peer's address on the first subflow.
    public var sourceAddress: String
    /// The name's addresses, resolved forward; nil when it was not resolved.
    public var resolvedAddresses: [String]?
    /// Why resolution gave nothing, for the explanation.
    public var resolutionFailure: String?
    /// The Ed25519 public key whose possession the peer proved in this session's handshake.
    public var provenKey: [UInt8]?
    /// The key pinned locally for `claimedName`, if any.
    public var pinnedKey: [UInt8]?

    public init(claimedName: String, sourceAddress: String, resolvedAddresses: [String]? = nil, resolutionFailure: String? = nil,
                provenKey: [UInt8]? = nil, pinnedKey: [UInt8]? = nil) {
        self.claimedName = claimedName
        self.sourceAddress = sourceAddress
        self.resolvedAddresses = resolvedAddresses
        self.resolutionFailure = resolutionFailure
        self.provenKey = provenKey
        self.pinnedKey = pinnedKey
    }
}

public struct VerificationResult: Sendable, Equatable {
    public var level: PeerVerification
    /// Why the level is what it is, e.g. "name client.example resolves to 198.51.100.2, not 192.0.2.9".
    public var detail: String
    /// Set when the session must be refused whatever the policy: a pinned or self-certifying name
    /// claimed without proving its key is a forgery, not merely an unverified name.
    public var forgery: Bool
}

/// The verification rules, as pure functions, so each rule is tested without sockets.
public enum NameVerifier {
    /// Whether the claimed name is worth resolving: keys decide for pinned and self-certifying
    /// names, and an address literal is not a name.
    public static func needsResolution(_ name: String, pinned: Bool) -> Bool {
        !pinned && !SelfCertifyingName.isSelfCertifying(name) && !isAddressLiteral(name)
    }

    public static func isAddressLiteral(_ name: String) -> Bool {
        (try? SocketAddress(ipAddress: name, port: 0)) != nil
    }

    public static func evaluate(_ e: PeerEvidence) -> VerificationResult {
        let name = e.claimedName
        if let pinned = e.pinnedKey {
            if let proven = e.provenKey, proven == pinned {
                return .init(level: .keyVerified, detail: "\(name) proved its pinned key", forgery: false)
            }
            let what = e.provenKey.map { "key \(Base64.encode($0))" } ?? "no key"
            return .init(level: .claimed, detail: "\(name) is pinned to key \(Base64.encode(pinned)), but the peer proved \(what)", forgery: true)
        }
        if SelfCertifyingName.isSelfCertifying(name) {
            if let proven = e.provenKey, SelfCertifyingName.matches(name, publicKey: proven) {
                return .init(level: .keyVerified, detail: "\(name) is self-certifying and the peer proved its key", forgery: false)
            }
            let what = e.provenKey.map { "the key of \(SelfCertifyingName.name(for: $0))" } ?? "no key"
            return .init(level: .claimed, detail: "\(name) is self-certifying, but the peer proved \(what)", forgery: true)
        }
        if isAddressLiteral(name) {
            return .init(level: .claimed, detail: "\(name) is an address, not a name", forgery: false)
        }
        guard let resolved = e.resolvedAddresses, !resolved.isEmpty else {
            return .init(level: .claimed, detail: "name \(name) could not be resolved\(e.resolutionFailure.map { ": \($0)" } ?? "")", forgery: false)
        }
        let source = normalizedIP(e.sourceAddress)
        let addresses = resolved.map(normalizedIP)
        if addresses.contains(source) {
            return .init(level: .dnsConfirmed, detail: "name \(name) resolves to \(source)", forgery: false)
        }
        return .init(level: .claimed, detail: "name \(name) resolves to \(addresses.joined(separator: ", ")), not \(source)", forgery: false)
    }

    /// nil when a session with `result` may go on under `required`; else the reason to refuse it.
    public static func refusal(_ result: VerificationResult, required: PeerVerification) -> String? {
        if result.forgery { return result.detail }
        guard result.level >= required else { return "\(required.rawValue) required, peer is only \(result.level.rawValue): \(result.detail)" }
        return nil
    }

    /// IPv4-mapped IPv6 (a dual-stack listener's view of IPv4 peers) compares as the IPv4 it is.
    static func normalizedIP(_ ip: String) -> String {
        guard let address = try? SocketAddress(ipAddress: ip, port: 0) else { return ip.lowercased() }
        return address.unmapped.hostString
    }
}

extension NBSOptions {
    func pinnedKey(for name: String) -> [UInt8]? {
        let wanted = canonicalName(name)
        return pinnedKeys.first { canonicalName($0.key) == wanted }?.value
    }

    /// Whether an opener lets the listener admit the session at OPEN, a round trip sooner: only
    /// when it has no proof of its own to send and its verdict on the listener cannot be a refusal
    /// (nothing above `claimed` required; the name neither pinned nor self-certifying, where a
    /// missing proof is a forgery). Otherwise a listener's application could see, and write to, a
    /// session the opener is about to refuse.
    func admitsAtOpen(_ peerName: String) -> Bool {
        identity == nil && requiredPeerVerification == .claimed && pinnedKey(for: peerName) == nil
            && !SelfCertifyingName.isSelfCertifying(peerName)
    }
}

/// An identity key on disk: created atomically with mode 0600, and refused when group or others
/// could read or write it. Format: a comment line, then `ed25519 BASE64-PRIVATE-KEY`.
public enum IdentityKeyFile {
    static let keyword = "ed25519"

    /// Creates a new key at `path`; never overwrites an existing file.
    public static func create(at path: String) throws(IdentityError) -> NBSIdentity {
        let identity = NBSIdentity()
        let text = "# NBS identity of \(identity.selfCertifyingName). Private: keep mode 0600.\n\(keyword) \(Base64.encode(identity.privateKey))\n"
        // Written to a private temporary file, then linked into place: the key is never visible
        // with other permissions or half-written, and link() fails rather than replace a file.
        let temporary = "\(path).tmp-\(Base64.encode(randomBytes(6)).replacingSlashes())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .keyFile(path: path, reason: "cannot create: \(errnoText())") }
        defer { unlink(temporary) }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let ok = written == bytes.count && fchmod(fd, 0o600) == 0 && fsync(fd) == 0
        let failure = errnoText()
        close(fd)
        guard ok else { throw .keyFile(path: path, reason: "cannot write: \(failure)") }
        guard link(temporary, path) == 0 else {
            throw .keyFile(path: path, reason: errno == EEXIST ? "already exists; not overwriting it" : "cannot create: \(errnoText())")
        }
        return identity
    }

    public static func load(from path: String) throws(IdentityError) -> NBSIdentity {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .keyFile(path: path, reason: "cannot open: \(errnoText())") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .keyFile(path: path, reason: "cannot stat: \(errnoText())") }
        guard info.st_mode & S_IFMT == S_IFREG else { throw .keyFile(path: path, reason: "not a regular file") }
        let mode = info.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            throw .keyFile(path: path, reason: "mode \(String(mode, radix: 8)) lets group or others read or write it; run chmod 600 \(path)")
        }
        guard info.st_uid == geteuid() else { throw .keyFile(path: path, reason: "owned by uid \(info.st_uid), not by this user (\(geteuid()))") }
        var bytes = [UInt8](repeating: 0, count: 4096)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count >= 0 else { throw .keyFile(path: path, reason: "cannot read: \(errnoText())") }
        let text = String(decoding: bytes.prefix(count), as: UTF8.self)
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let fields = line.split(separator: " ")
            guard fields.count == 2, fields[0] == keyword, let key = Base64.decode(String(fields[1])) else { break }
            do { return try NBSIdentity(privateKey: key) } catch { throw .keyFile(path: path, reason: "\(error)") }
        }
        throw .keyFile(path: path, reason: "no '\(keyword) BASE64' line")
    }

    private static func errnoText() -> String { String(cString: strerror(errno)) }
}

extension String {
    fileprivate func replacingSlashes() -> String { String(map { $0 == "/" ? "_" : $0 }) }
}

import Crypto
import NIOCore

/// The session secret agreed with X25519 and what is derived from it. Unlike MPTCP, whose keys
/// travel in clear, an observer of the handshake learns nothing that lets it JOIN or forge signals.
public struct SessionKeys: Sendable {
    /// HMAC key for everything the client (opener) authenticates.
    /// Raw bytes rather than SymmetricKey, which is not Sendable in swift-crypto 3.
    let clientKey: [UInt8]
    /// HMAC key for everything the server (listener) authenticates.
    let serverKey: [UInt8]

    public enum Role: Sendable { case client, server }

    /// Both sides call this with the same transcript; `localPrivateKey` is their own ephemeral key.
    public init(
        localPrivateKey: Curve25519.KeyAgreement.PrivateKey,
        peerPublicKey: [UInt8],
        open: Frame.Open,
        serverName: String,
        serverNonce: [UInt8],
        token: UInt64
    ) throws {
        let peer = try Curve25519.KeyAgreement.PublicKey(rawRepresentation: peerPublicKey)
        let shared = try localPrivateKey.sharedSecretFromKeyAgreement(with: peer)
        var info = ByteBuffer()
        info.writeString("NBS-1 session")
        for name in [open.sourceName, open.destinationName, serverName] {
            info.writeInteger(UInt8(name.utf8.count))
            info.writeString(name)
        }
        info.writeInteger(open.port)
        info.writeInteger(token)
        // The window lets the listener send before anything authenticated came from the opener:
        // bound into the keys, a window changed on the way makes the ACCEPT's MAC fail.
        if let window = open.receiveWindow { info.writeInteger(window) }
        let infoBytes = Array(info.readableBytesView)
        let salt = open.nonce + serverNonce
        let material = shared.hkdfDerivedSymmetricKey(using: SHA256.self, salt: salt, sharedInfo: infoBytes, outputByteCount: 64)
        let bytes = material.withUnsafeBytes { Array($0) }
        clientKey = Array(bytes[0..<32])
        serverKey = Array(bytes[32..<64])
    }

    func key(for role: Role) -> SymmetricKey { SymmetricKey(data: role == .client ? clientKey : serverKey) }

    /// MAC of `label || fields` under the key of `sender`.
    public func mac(_ label: SignalLabel, by sender: Role, _ fields: [UInt8]) -> [UInt8] {
        var h = HMAC<SHA256>(key: key(for: sender))
        h.update(data: Array(label.rawValue.utf8))
        h.update(data: [0])
        h.update(data: fields)
        return Array(h.finalize())
    }

    public func verify(_ label: SignalLabel, by sender: Role, _ fields: [UInt8], mac: [UInt8]) -> Bool {
        guard mac.count == NBSWire.macLength else { return false }
        var h = HMAC<SHA256>(key: key(for: sender))
        h.update(data: Array(label.rawValue.utf8))
        h.update(data: [0])
        h.update(data: fields)
        return constantTimeEqual(Array(h.finalize()), mac)
    }

    public enum SignalLabel: String, Sendable {
        case accept, join, joinAck = "join-ack", addAddress = "add-addr", removeAddress = "remove-addr", priority = "prio", close, abort
    }

    // MARK: field layouts that each MAC covers (documented in PROTOCOL.md)

    public static func acceptFields(_ a: Frame.Accept) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(a.token)
        b.writeBytes(a.publicKey)
        b.writeBytes(a.nonce)
        b.writeInteger(a.receiveWindow)
        return Array(b.readableBytesView)
    }

    public static func joinFields(token: UInt64, nonce: [UInt8], backup: Bool) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(token)
        b.writeBytes(nonce)
        b.writeInteger(UInt8(backup ? 1 : 0))
        return Array(b.readableBytesView)
    }

    public static func joinAckFields(token: UInt64, clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(token)
        b.writeBytes(clientNonce)
        b.writeBytes(serverNonce)
        return Array(b.readableBytesView)
    }

    public static func addressFields(_ address: WireAddress, id: UInt8, sequence: UInt32) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(id)
        b.writeBytes(address.bytes)
        b.writeInteger(address.port)
        b.writeInteger(sequence)
        return Array(b.readableBytesView)
    }

    public static func priorityFields(backup: Bool, sequence: UInt32) -> [UInt8] {
        [backup ? 1 : 0] + withUnsafeBytes(of: sequence.bigEndian) { Array($0) }
    }

    public static func closeFields(_ reason: CloseReason, message: String) -> [UInt8] {
        withUnsafeBytes(of: reason.rawValue.bigEndian) { Array($0) } + Array(truncatedUTF8(message, maxBytes: NBSWire.maxReasonLength).utf8)
    }
}

func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var diff: UInt8 = 0
    for i in a.indices { diff |= a[i] ^ b[i] }
    return diff == 0
}

public func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
}

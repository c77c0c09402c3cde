import Crypto
import NIOCore

public enum HandshakeError: Error, Equatable, Sendable, CustomStringConvertible {
    case badPublicKey
    case authenticationFailed
    case unexpectedFrame(FrameType)
    case refused(CloseReason, String)

    public var description: String {
        switch self {
        case .badPublicKey: "peer sent an invalid X25519 public key"
        case .authenticationFailed: "handshake authentication failed"
        case .unexpectedFrame(let t): "unexpected \(t) frame during the handshake"
        case .refused(let reason, let message): "refused by peer: \(reason)\(message.isEmpty ? "" : " (\(message))")"
        }
    }
}

/// Names compare case-insensitively and without a trailing dot, as DNS names do.
public func canonicalName(_ name: String) -> String {
    var n = name.lowercased()
    while n.hasSuffix(".") { n.removeLast() }
    return n
}

/// The opener's side of OPEN/ACCEPT.
/// `@unchecked Sendable`: swift-crypto 3 does not mark the key Sendable, and it is never changed
/// after `init`, only read. Kept as the key rather than its raw bytes (as before): importing raw
/// bytes computes the public key again, an X25519 multiplication on the opener's path after ACCEPT.
public struct ClientHandshake: @unchecked Sendable {
    private let privateKey: Curve25519.KeyAgreement.PrivateKey
    public let open: Frame.Open

    /// `receiveWindow`: only for an opener that will send no IDENTITY (`Frame.Open.receiveWindow`).
    public init(sourceName: String, destinationName: String, port: UInt16, receiveWindow: UInt32? = nil) {
        let privateKey = Curve25519.KeyAgreement.PrivateKey()
        self.privateKey = privateKey
        open = Frame.Open(sourceName: sourceName, destinationName: destinationName, port: port,
                          publicKey: Array(privateKey.publicKey.rawRepresentation), nonce: randomBytes(NBSWire.nonceLength),
                          receiveWindow: receiveWindow)
    }

    /// Checks ACCEPT and derives the session keys; the ACCEPT's MAC proves the server holds the
    /// same secret, so a man in the middle that swapped keys is caught here.
    public func complete(with accept: Frame.Accept) throws(HandshakeError) -> SessionKeys {
        let keys: SessionKeys
        do {
            keys = try SessionKeys(localPrivateKey: privateKey, peerPublicKey: accept.publicKey, open: open,
                                   serverName: accept.serverName, serverNonce: accept.nonce, token: accept.token)
        } catch {
            throw .badPublicKey
        }
        guard keys.verify(.accept, by: .server, SessionKeys.acceptFields(accept), mac: accept.mac) else {
            throw .authenticationFailed
        }
        return keys
    }
}

/// The listener's side: answer an OPEN with an ACCEPT and the keys.
public enum ServerHandshake {
    /// `privateKey`: a fresh ephemeral key, used for this handshake only.
    public static func accept(_ open: Frame.Open, serverName: String, token: UInt64, receiveWindow: UInt32,
                              privateKey: Curve25519.KeyAgreement.PrivateKey = .init()) throws(HandshakeError) -> (Frame.Accept, SessionKeys) {
        let nonce = randomBytes(NBSWire.nonceLength)
        let keys: SessionKeys
        do {
            keys = try SessionKeys(localPrivateKey: privateKey, peerPublicKey: open.publicKey, open: open,
                                   serverName: serverName, serverNonce: nonce, token: token)
        } catch {
            throw .badPublicKey
        }
        var accept = Frame.Accept(serverName: serverName, token: token, publicKey: Array(privateKey.publicKey.rawRepresentation),
                                  nonce: nonce, receiveWindow: receiveWindow, mac: [])
        accept.mac = keys.mac(.accept, by: .server, SessionKeys.acceptFields(accept))
        return (accept, keys)
    }
}

/// JOIN and its acknowledgement, and the replay guard for JOIN nonces. Both MACs bind the token
/// and both nonces, so neither a replayed JOIN nor a replayed JOIN_ACK is accepted.
public struct JoinAuthenticator: Sendable {
    public let keys: SessionKeys
    public let token: UInt64
    private var seenNonces: Set<[UInt8]> = []
    public static let maxRememberedNonces = 4096

    public init(keys: SessionKeys, token: UInt64) {
        self.keys = keys
        self.token = token
    }

    public func makeJoin(backup: Bool) -> Frame.Join {
        let nonce = randomBytes(NBSWire.nonceLength)
        let mac = keys.mac(.join, by: .client, SessionKeys.joinFields(token: token, nonce: nonce, backup: backup))
        return Frame.Join(token: token, nonce: nonce, backup: backup, mac: mac)
    }

    public enum JoinVerdict: Equatable, Sendable {
        case accepted(Frame.JoinAck)
        case refused(CloseReason)
    }

    public mutating func verify(_ join: Frame.Join) -> JoinVerdict {
        guard join.token == token,
            keys.verify(.join, by: .client, SessionKeys.joinFields(token: token, nonce: join.nonce, backup: join.backup), mac: join.mac)
        else { return .refused(.authenticationFailed) }
        guard !seenNonces.contains(join.nonce) else { return .refused(.replay) }
        // Past this many joins a session refuses more rather than forgetting nonces it has seen.
        guard seenNonces.count < Self.maxRememberedNonces else { return .refused(.resourceLimit) }
        seenNonces.insert(join.nonce)
        let serverNonce = randomBytes(NBSWire.nonceLength)
        let mac = keys.mac(.joinAck, by: .server, SessionKeys.joinAckFields(token: token, clientNonce: join.nonce, serverNonce: serverNonce))
        return .accepted(Frame.JoinAck(nonce: serverNonce, mac: mac))
    }

    public func verify(_ ack: Frame.JoinAck, for join: Frame.Join) -> Bool {
        keys.verify(.joinAck, by: .server, SessionKeys.joinAckFields(token: token, clientNonce: join.nonce, serverNonce: ack.nonce), mac: ack.mac)
    }
}

/// ADD_ADDR, REMOVE_ADDR, PRIO, CLOSE and ABORT carry a per-direction sequence number under the
/// MAC; a receiver accepts only increasing numbers, so a recorded signal cannot be replayed.
public struct SignalAuthenticator: Sendable {
    public let keys: SessionKeys
    public let localRole: SessionKeys.Role
    private var nextSequence: UInt32 = 1
    private var lastAcceptedSequence: UInt32 = 0
    public private(set) var rejected = 0

    public init(keys: SessionKeys, localRole: SessionKeys.Role) {
        self.keys = keys
        self.localRole = localRole
    }

    private var peerRole: SessionKeys.Role { localRole == .client ? .server : .client }

    private mutating func takeSequence() -> UInt32 {
        defer { nextSequence &+= 1 }
        return nextSequence
    }

    public mutating func addAddress(_ address: WireAddress, id: UInt8) -> Frame {
        let sequence = takeSequence()
        return .addAddress(.init(addressID: id, address: address, sequence: sequence,
                                 mac: keys.mac(.addAddress, by: localRole, SessionKeys.addressFields(address, id: id, sequence: sequence))))
    }

    public mutating func removeAddress(_ address: WireAddress) -> Frame {
        let sequence = takeSequence()
        return .removeAddress(.init(address: address, sequence: sequence,
                                    mac: keys.mac(.removeAddress, by: localRole, SessionKeys.addressFields(address, id: 0, sequence: sequence))))
    }

    public mutating func priority(backup: Bool) -> Frame {
        let sequence = takeSequence()
        return .priority(.init(backup: backup, sequence: sequence,
                               mac: keys.mac(.priority, by: localRole, SessionKeys.priorityFields(backup: backup, sequence: sequence))))
    }

    /// CLOSE and ABORT are idempotent, so they need no sequence number: a replay can only repeat
    /// what already happened to a session that is gone.
    public func close(_ reason: CloseReason, _ message: String, abort: Bool) -> Frame {
        let label: SessionKeys.SignalLabel = abort ? .abort : .close
        let body = Frame.Close(reason: reason, message: message, mac: keys.mac(label, by: localRole, SessionKeys.closeFields(reason, message: message)))
        return abort ? .abort(body) : .close(body)
    }

    /// True when `frame` (a signal from the peer) is authentic and not a replay.
    public mutating func accept(_ frame: Frame) -> Bool {
        let ok: Bool
        switch frame {
        case .addAddress(let a):
            ok = fresh(a.sequence) && keys.verify(.addAddress, by: peerRole, SessionKeys.addressFields(a.address, id: a.addressID, sequence: a.sequence), mac: a.mac)
            if ok { lastAcceptedSequence = a.sequence }
        case .removeAddress(let r):
            ok = fresh(r.sequence) && keys.verify(.removeAddress, by: peerRole, SessionKeys.addressFields(r.address, id: 0, sequence: r.sequence), mac: r.mac)
            if ok { lastAcceptedSequence = r.sequence }
        case .priority(let p):
            ok = fresh(p.sequence) && keys.verify(.priority, by: peerRole, SessionKeys.priorityFields(backup: p.backup, sequence: p.sequence), mac: p.mac)
            if ok { lastAcceptedSequence = p.sequence }
        case .close(let c):
            ok = keys.verify(.close, by: peerRole, SessionKeys.closeFields(c.reason, message: c.message), mac: c.mac)
        case .abort(let c):
            ok = keys.verify(.abort, by: peerRole, SessionKeys.closeFields(c.reason, message: c.message), mac: c.mac)
        default:
            ok = false
        }
        if !ok { rejected += 1 }
        return ok
    }

    private func fresh(_ sequence: UInt32) -> Bool { sequence > lastAcceptedSequence }
}

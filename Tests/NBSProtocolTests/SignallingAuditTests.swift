import Crypto
import NIOCore
import Testing

@testable import NBSProtocol

/// The claims docs/SECURITY.md makes about signalling, each checked against the code.
@Suite("Authenticated signalling: what an observer of the handshake can and cannot do")
struct SignallingAuditTests {
    @Test("the session secret mixes in both nonces: changing either changes both keys")
    func bothNoncesInSecret() throws {
        let clientKey = Curve25519.KeyAgreement.PrivateKey()
        let serverKey = Curve25519.KeyAgreement.PrivateKey()
        let open = Frame.Open(sourceName: "c", destinationName: "s", port: 1, publicKey: Array(clientKey.publicKey.rawRepresentation),
                              nonce: randomBytes(16))
        let serverNonce = randomBytes(16)
        func keys(_ open: Frame.Open, _ serverNonce: [UInt8]) throws -> SessionKeys {
            try SessionKeys(localPrivateKey: serverKey, peerPublicKey: open.publicKey, open: open, serverName: "s", serverNonce: serverNonce, token: 9)
        }
        let base = try keys(open, serverNonce)
        var otherClientNonce = open
        otherClientNonce.nonce[15] ^= 1
        var otherServerNonce = serverNonce
        otherServerNonce[0] ^= 1
        for variant in [try keys(otherClientNonce, serverNonce), try keys(open, otherServerNonce)] {
            #expect(variant.clientKey != base.clientKey)
            #expect(variant.serverKey != base.serverKey)
        }
    }

    @Test("someone who recorded OPEN and ACCEPT cannot JOIN, announce, close or abort")
    func observerCannotSignal() throws {
        let f = try HandshakeFixture()
        // Everything the observer saw, fed to the key derivation with the only private key he has.
        let observer = Curve25519.KeyAgreement.PrivateKey()
        let guessed = try SessionKeys(localPrivateKey: observer, peerPublicKey: f.accept.publicKey, open: f.client.open,
                                      serverName: f.accept.serverName, serverNonce: f.accept.nonce, token: f.accept.token)
        var server = JoinAuthenticator(keys: f.serverKeys, token: f.token)
        let forgedJoin = JoinAuthenticator(keys: guessed, token: f.token).makeJoin(backup: false)
        #expect(server.verify(forgedJoin) == .refused(.authenticationFailed))
        var serverSignals = SignalAuthenticator(keys: f.serverKeys, localRole: .server)
        var forger = SignalAuthenticator(keys: guessed, localRole: .client)
        let address = WireAddress(bytes: [203, 0, 113, 66], port: 4433)!
        let forged: [Frame] = [
            forger.addAddress(address, id: 1), forger.removeAddress(address), forger.priority(backup: true),
            forger.close(.normal, "", abort: false), forger.close(.verificationFailed, "forged", abort: true),
            // No MAC at all.
            .close(.init(reason: .normal, message: "")),
        ]
        for frame in forged {
            let accepted = serverSignals.accept(frame)
            #expect(!accepted, "\(frame.type)")
        }
        #expect(serverSignals.rejected == 6)
    }

    @Test("a replayed JOIN and a replayed ADD_ADDR are refused even after other signals")
    func replays() throws {
        let f = try HandshakeFixture()
        var server = JoinAuthenticator(keys: f.serverKeys, token: f.token)
        let client = JoinAuthenticator(keys: f.clientKeys, token: f.token)
        let join = client.makeJoin(backup: false)
        guard case .accepted = server.verify(join) else {
            Issue.record("genuine JOIN refused")
            return
        }
        guard case .accepted = server.verify(client.makeJoin(backup: true)) else {
            Issue.record("second genuine JOIN refused")
            return
        }
        #expect(server.verify(join) == .refused(.replay))
        var sender = SignalAuthenticator(keys: f.clientKeys, localRole: .client)
        var receiver = SignalAuthenticator(keys: f.serverKeys, localRole: .server)
        let add = sender.addAddress(WireAddress(bytes: [198, 51, 100, 7], port: 1)!, id: 2)
        let fresh = receiver.accept(add)
        #expect(fresh)
        let prio = receiver.accept(sender.priority(backup: false))
        #expect(prio)
        let replayed = receiver.accept(add)
        #expect(!replayed)
    }
}

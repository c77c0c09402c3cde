import NIOCore
import Testing

@testable import NBSProtocol

/// A completed OPEN/ACCEPT exchange.
struct HandshakeFixture {
    let client: ClientHandshake
    let accept: Frame.Accept
    let serverKeys: SessionKeys
    let clientKeys: SessionKeys
    let token: UInt64

    init(token: UInt64 = 0x1122_3344_5566_7788, window: UInt32 = 1 << 20) throws {
        client = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 4433)
        (accept, serverKeys) = try ServerHandshake.accept(client.open, serverName: "server.example", token: token, receiveWindow: window)
        clientKeys = try client.complete(with: accept)
        self.token = token
    }
}

/// Sends a frame through the codec, as the peer would receive it.
func overTheWire(_ frame: Frame) throws -> Frame {
    var b = encoded(frame)
    var decoder = FrameDecoder(expectPreamble: false)
    let decoded = try #require(try decoder.next(from: &b))
    #expect(b.readableBytes == 0)
    return decoded
}

@Suite("Handshake and signal authentication")
struct HandshakeTests {
    @Test("client and server derive the same keys")
    func sameKeys() throws {
        let f = try HandshakeFixture()
        #expect(f.clientKeys.clientKey == f.serverKeys.clientKey)
        #expect(f.clientKeys.serverKey == f.serverKeys.serverKey)
        #expect(f.clientKeys.clientKey != f.clientKeys.serverKey)
        #expect(f.clientKeys.clientKey.count == 32)
        // The OPEN and ACCEPT carry what they should.
        #expect(f.client.open.version == NBSWire.version)
        #expect(f.client.open.publicKey.count == NBSWire.publicKeyLength)
        #expect(f.client.open.nonce.count == NBSWire.nonceLength)
        #expect(f.accept.token == f.token)
        #expect(f.accept.receiveWindow == 1 << 20)
        #expect(f.accept.mac.count == NBSWire.macLength)
        #expect(f.accept.publicKey != f.client.open.publicKey)
    }

    @Test("the handshake survives the wire")
    func overWire() throws {
        let client = ClientHandshake(sourceName: Samples.longestName, destinationName: "server.example", port: 1)
        guard case .open(let open) = try overTheWire(.open(client.open)) else {
            Issue.record("not an OPEN")
            return
        }
        let (accept, serverKeys) = try ServerHandshake.accept(open, serverName: Samples.longestUnicodeName, token: 5, receiveWindow: 9)
        guard case .accept(let received) = try overTheWire(.accept(accept)) else {
            Issue.record("not an ACCEPT")
            return
        }
        let keys = try client.complete(with: received)
        #expect(keys.clientKey == serverKeys.clientKey)
    }

    @Test("an OPEN's window survives the wire behind its flag, and one without a window has neither")
    func openWindowOnTheWire() throws {
        let with = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 1, receiveWindow: 0xDEAD_BEEF)
        let without = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 1)
        #expect(try overTheWire(.open(with.open)) == .open(with.open))
        #expect(try overTheWire(.open(without.open)) == .open(without.open))
        let withBytes = encoded(.open(with.open)), withoutBytes = encoded(.open(without.open))
        #expect(withBytes.getInteger(at: 1, as: UInt8.self) == NBSWire.openWindowFlag)
        #expect(withoutBytes.getInteger(at: 1, as: UInt8.self) == 0)
        #expect(withBytes.readableBytes == withoutBytes.readableBytes + 4)
        // The flag without the window is a truncated frame, not a window of garbage.
        var truncated = withoutBytes
        truncated.setInteger(NBSWire.openWindowFlag, at: 1)
        var decoder = FrameDecoder(expectPreamble: false)
        #expect(throws: FrameDecodingError.self) { try decoder.next(from: &truncated) }
    }

    @Test("a window changed on the way, or added or removed, makes the ACCEPT fail: it is bound into the keys")
    func openWindowIsAuthenticated() throws {
        let client = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 1, receiveWindow: 1 << 16)
        let honest = try ServerHandshake.accept(client.open, serverName: "server.example", token: 3, receiveWindow: 9).0
        #expect(throws: Never.self) { try client.complete(with: honest) }
        for window: UInt32? in [1 << 30, nil] {
            var changed = client.open
            changed.receiveWindow = window
            let (accept, _) = try ServerHandshake.accept(changed, serverName: "server.example", token: 3, receiveWindow: 9)
            #expect(throws: HandshakeError.authenticationFailed) { try client.complete(with: accept) }
        }
    }

    @Test("two sessions never share keys")
    func distinctSessions() throws {
        let one = try HandshakeFixture()
        let two = try HandshakeFixture()
        #expect(one.clientKeys.clientKey != two.clientKeys.clientKey)
        // A JOIN made for one session does not verify in another with the same token.
        var other = JoinAuthenticator(keys: two.serverKeys, token: two.token)
        let join = JoinAuthenticator(keys: one.clientKeys, token: one.token).makeJoin(backup: false)
        #expect(other.verify(join) == .refused(.authenticationFailed))
    }

    @Test("an ACCEPT with any field tampered with fails authentication")
    func tamperedAccept() throws {
        let f = try HandshakeFixture()
        var tampered: [(String, Frame.Accept)] = []
        var x = f.accept
        x.serverName = "evil.example"
        tampered.append(("serverName", x))
        x = f.accept
        x.token ^= 1
        tampered.append(("token", x))
        x = f.accept
        x.publicKey[0] ^= 0x02
        tampered.append(("publicKey", x))
        x = f.accept
        x.nonce[3] ^= 0x80
        tampered.append(("nonce", x))
        x = f.accept
        x.receiveWindow &+= 1
        tampered.append(("receiveWindow", x))
        x = f.accept
        x.mac[31] ^= 1
        tampered.append(("mac", x))
        x = f.accept
        x.mac = []
        tampered.append(("empty mac", x))
        for (field, accept) in tampered {
            #expect(throws: HandshakeError.authenticationFailed, "tampered \(field)") { try f.client.complete(with: accept) }
        }
        #expect(throws: Never.self) { try f.client.complete(with: f.accept) }
    }

    @Test("a man in the middle who alters the OPEN is caught by the ACCEPT's MAC")
    func tamperedOpen() throws {
        let client = ClientHandshake(sourceName: "client.example", destinationName: "server.example", port: 4433)
        var alterations: [Frame.Open] = []
        var o = client.open
        o.destinationName = "other.example"
        alterations.append(o)
        o = client.open
        o.sourceName = "mallory.example"
        alterations.append(o)
        o = client.open
        o.port = 80
        alterations.append(o)
        o = client.open
        o.nonce[0] ^= 1
        alterations.append(o)
        for open in alterations {
            let (accept, _) = try ServerHandshake.accept(open, serverName: "server.example", token: 1, receiveWindow: 1)
            #expect(throws: HandshakeError.authenticationFailed) { try client.complete(with: accept) }
        }
    }

    @Test("invalid public keys are refused")
    func badPublicKeys() throws {
        let client = ClientHandshake(sourceName: "c", destinationName: "s", port: 1)
        var open = client.open
        open.publicKey = [1, 2, 3]
        #expect(throws: HandshakeError.badPublicKey) { try ServerHandshake.accept(open, serverName: "s", token: 1, receiveWindow: 1) }
        let f = try HandshakeFixture()
        var accept = f.accept
        accept.publicKey = Array(accept.publicKey.prefix(31))
        #expect(throws: HandshakeError.badPublicKey) { try f.client.complete(with: accept) }
        for error in [HandshakeError.badPublicKey, .authenticationFailed, .unexpectedFrame(.data), .refused(.nameNotServed, "x")] {
            #expect(!error.description.isEmpty)
        }
    }

    @Test("names compare without case or trailing dots")
    func names() {
        #expect(canonicalName("Server.Example.") == "server.example")
        #expect(canonicalName("a..") == "a")
        #expect(canonicalName("x.y") == canonicalName("X.Y."))
        #expect(canonicalName("a.b") != canonicalName("a.c"))
    }

    // MARK: JOIN

    @Test("a JOIN made by the client verifies at the server, and its JOIN_ACK at the client")
    func join() throws {
        let f = try HandshakeFixture()
        let clientJoins = JoinAuthenticator(keys: f.clientKeys, token: f.token)
        var serverJoins = JoinAuthenticator(keys: f.serverKeys, token: f.token)
        for backup in [false, true] {
            let join = clientJoins.makeJoin(backup: backup)
            #expect(join.token == f.token && join.backup == backup)
            guard case .join(let received) = try overTheWire(.join(join)) else {
                Issue.record("not a JOIN")
                return
            }
            guard case .accepted(let ack) = serverJoins.verify(received) else {
                Issue.record("JOIN refused")
                return
            }
            guard case .joinAck(let ackReceived) = try overTheWire(.joinAck(ack)) else {
                Issue.record("not a JOIN_ACK")
                return
            }
            #expect(clientJoins.verify(ackReceived, for: join))
        }
    }

    @Test("JOINs with a wrong token, a bad MAC or a changed flag are refused; a replay is refused as such")
    func badJoins() throws {
        let f = try HandshakeFixture()
        let clientJoins = JoinAuthenticator(keys: f.clientKeys, token: f.token)
        var server = JoinAuthenticator(keys: f.serverKeys, token: f.token)
        let good = clientJoins.makeJoin(backup: false)

        var wrongToken = good
        wrongToken.token &+= 1
        #expect(server.verify(wrongToken) == .refused(.authenticationFailed))
        // Made for another token altogether (correctly MAC'd under that token).
        let otherToken = JoinAuthenticator(keys: f.clientKeys, token: f.token &+ 1).makeJoin(backup: false)
        #expect(server.verify(otherToken) == .refused(.authenticationFailed))
        var badMAC = good
        badMAC.mac[0] ^= 1
        #expect(server.verify(badMAC) == .refused(.authenticationFailed))
        var shortMAC = good
        shortMAC.mac = Array(good.mac.prefix(16))
        #expect(server.verify(shortMAC) == .refused(.authenticationFailed))
        var flipped = good
        flipped.backup = true
        #expect(server.verify(flipped) == .refused(.authenticationFailed))
        var otherNonce = good
        otherNonce.nonce[0] ^= 1
        #expect(server.verify(otherNonce) == .refused(.authenticationFailed))
        // Made with the server's key rather than the client's.
        var forged = good
        forged.mac = f.serverKeys.mac(.join, by: .server, SessionKeys.joinFields(token: f.token, nonce: good.nonce, backup: false))
        #expect(server.verify(forged) == .refused(.authenticationFailed))

        // Failed attempts harm nothing: the genuine JOIN still gets in, once.
        guard case .accepted = server.verify(good) else {
            Issue.record("genuine JOIN refused after failed attempts")
            return
        }
        #expect(server.verify(good) == .refused(.replay))
        let second = clientJoins.makeJoin(backup: true)
        guard case .accepted = server.verify(second) else {
            Issue.record("a fresh JOIN refused")
            return
        }
    }

    @Test("a JOIN_ACK verifies only for its own JOIN")
    func joinAckBinding() throws {
        let f = try HandshakeFixture()
        let clientJoins = JoinAuthenticator(keys: f.clientKeys, token: f.token)
        var server = JoinAuthenticator(keys: f.serverKeys, token: f.token)
        let join1 = clientJoins.makeJoin(backup: false)
        let join2 = clientJoins.makeJoin(backup: false)
        guard case .accepted(let ack1) = server.verify(join1), case .accepted(let ack2) = server.verify(join2) else {
            Issue.record("JOIN refused")
            return
        }
        #expect(clientJoins.verify(ack1, for: join1))
        #expect(clientJoins.verify(ack2, for: join2))
        #expect(!clientJoins.verify(ack1, for: join2))  // replayed onto another subflow
        var tampered = ack1
        tampered.nonce[0] ^= 1
        #expect(!clientJoins.verify(tampered, for: join1))
        tampered = ack1
        tampered.mac[5] ^= 1
        #expect(!clientJoins.verify(tampered, for: join1))
        // A JOIN_ACK computed with the client's own key (a reflection) does not verify.
        let reflected = Frame.JoinAck(nonce: ack1.nonce,
                                      mac: f.clientKeys.mac(.joinAck, by: .client, SessionKeys.joinAckFields(token: f.token, clientNonce: join1.nonce, serverNonce: ack1.nonce)))
        #expect(!clientJoins.verify(reflected, for: join1))
        // Nor from another session.
        let g = try HandshakeFixture(token: f.token)
        var otherServer = JoinAuthenticator(keys: g.serverKeys, token: f.token)
        if case .accepted(let foreign) = otherServer.verify(JoinAuthenticator(keys: g.clientKeys, token: f.token).makeJoin(backup: false)) {
            #expect(!clientJoins.verify(foreign, for: join1))
        } else {
            Issue.record("JOIN refused")
        }
    }

    @Test("past maxRememberedNonces, JOINs are refused rather than nonces forgotten")
    func nonceLimit() throws {
        let f = try HandshakeFixture()
        let clientJoins = JoinAuthenticator(keys: f.clientKeys, token: f.token)
        var server = JoinAuthenticator(keys: f.serverKeys, token: f.token)
        let first = clientJoins.makeJoin(backup: false)
        var accepted = 0
        if case .accepted = server.verify(first) { accepted += 1 }
        for _ in 1..<JoinAuthenticator.maxRememberedNonces {
            if case .accepted = server.verify(clientJoins.makeJoin(backup: false)) { accepted += 1 }
        }
        #expect(accepted == JoinAuthenticator.maxRememberedNonces)
        #expect(server.verify(clientJoins.makeJoin(backup: false)) == .refused(.resourceLimit))
        #expect(server.verify(first) == .refused(.replay))
    }

    // MARK: signals

    @Test("ADD_ADDR, REMOVE_ADDR and PRIO authenticate in the right direction, once")
    func signals() throws {
        let f = try HandshakeFixture()
        var clientSignals = SignalAuthenticator(keys: f.clientKeys, localRole: .client)
        var serverSignals = SignalAuthenticator(keys: f.serverKeys, localRole: .server)
        let frames = [
            clientSignals.addAddress(Samples.v4, id: 1),
            clientSignals.addAddress(Samples.v6, id: 2),
            clientSignals.removeAddress(Samples.v4),
            clientSignals.priority(backup: true),
            clientSignals.priority(backup: false),
        ]
        for frame in frames {
            let received = try overTheWire(frame)
            #expect(received == frame)
            // Accepted once; the same signal again is a replay.
            let verdicts = [serverSignals.accept(received), serverSignals.accept(received)]
            #expect(verdicts == [true, false], "\(frame.type)")
            // A client-made signal fed back to the client.
            var clientCopy = clientSignals
            let reflected = clientCopy.accept(received)
            #expect(!reflected, "reflected \(frame.type)")
        }
        #expect(serverSignals.rejected == frames.count)

        // The other direction.
        let fromServer = serverSignals.addAddress(Samples.v6Zero, id: 9)
        #expect(clientSignals.accept(try overTheWire(fromServer)))
        #expect(clientSignals.rejected == 0)
    }

    @Test("tampered signals are rejected")
    func tamperedSignals() throws {
        let f = try HandshakeFixture()
        var client = SignalAuthenticator(keys: f.clientKeys, localRole: .client)
        var server = SignalAuthenticator(keys: f.serverKeys, localRole: .server)
        var variants: [Frame] = []
        if case .addAddress(let add) = client.addAddress(Samples.v4, id: 1) {
            var x = add
            x.addressID = 2
            variants.append(.addAddress(x))
            x = add
            x.address.port &+= 1
            variants.append(.addAddress(x))
            x = add
            x.address.bytes[3] ^= 1
            variants.append(.addAddress(x))
            x = add
            x.sequence += 100
            variants.append(.addAddress(x))
            x = add
            x.mac[0] ^= 1
            variants.append(.addAddress(x))
            // The same fields, signed as a REMOVE_ADDR.
            variants.append(.removeAddress(.init(address: add.address, sequence: add.sequence, mac: add.mac)))
        }
        if case .priority(let prio) = client.priority(backup: true) {
            var x = prio
            x.backup = false
            variants.append(.priority(x))
            x = prio
            x.mac = []
            variants.append(.priority(x))
        }
        if case .removeAddress(let remove) = client.removeAddress(Samples.v6) {
            var x = remove
            x.address = Samples.v6Zero
            variants.append(.removeAddress(x))
        }
        #expect(variants.count == 9)
        for frame in variants {
            let accepted = server.accept(frame)
            #expect(!accepted, "\(frame)")
        }
        #expect(server.rejected == variants.count)
        // Not signals at all.
        let others = [Frame.probe(.init(identifier: 1)), .data(.init(sequence: 0, payload: buffer([1])))].map { server.accept($0) }
        #expect(others == [false, false])
    }

    @Test("signals are accepted only in increasing sequence")
    func signalOrder() throws {
        let f = try HandshakeFixture()
        var client = SignalAuthenticator(keys: f.clientKeys, localRole: .client)
        var server = SignalAuthenticator(keys: f.serverKeys, localRole: .server)
        let first = client.addAddress(Samples.v4, id: 1)
        let second = client.priority(backup: true)
        let third = client.removeAddress(Samples.v4)
        // An older signal, even a genuine one never seen before, is refused after a newer one.
        let verdicts = [second, first, third, second].map { server.accept($0) }
        #expect(verdicts == [true, false, true, false])
    }

    @Test("CLOSE and ABORT are authenticated")
    func closeAndAbort() throws {
        let f = try HandshakeFixture()
        var client = SignalAuthenticator(keys: f.clientKeys, localRole: .client)
        var server = SignalAuthenticator(keys: f.serverKeys, localRole: .server)
        let close = client.close(.normal, "bye", abort: false)
        let abort = client.close(.applicationAbort, "stop", abort: true)
        guard case .close(let c) = close, case .abort(let ab) = abort else {
            Issue.record("wrong frame types")
            return
        }
        #expect(c.mac.count == NBSWire.macLength && ab.mac.count == NBSWire.macLength)
        // A long reason is cut to 200 bytes on the wire, and the MAC still verifies.
        let long = client.close(.timeout, String(repeating: "t", count: 300), abort: true)
        let genuine = try [close, abort, long].map(overTheWire).map { server.accept($0) }
        #expect(genuine == [true, true, true])
        // Idempotent: a repeat is accepted (documented: no sequence number).
        let repeated = server.accept(close)
        #expect(repeated)

        var otherReason = c
        otherReason.reason = .shuttingDown
        var otherMessage = c
        otherMessage.message = "bye!"
        var noMAC = c
        noMAC.mac = []  // unauthenticated, once the session has keys
        let forged: [Frame] = [.abort(c), .close(ab), .close(otherReason), .close(otherMessage), .close(noMAC)]
        #expect(forged.map { server.accept($0) } == [false, false, false, false, false])
        let reflected = client.accept(close)
        #expect(!reflected)
        // The server's own close verifies at the client.
        let fromServer = client.accept(server.close(.normal, "", abort: false))
        #expect(fromServer)
    }

    @Test("MAC verification needs the exact length")
    func macLength() throws {
        let f = try HandshakeFixture()
        let fields: [UInt8] = [1, 2, 3]
        let mac = f.clientKeys.mac(.close, by: .client, fields)
        #expect(f.serverKeys.verify(.close, by: .client, fields, mac: mac))
        #expect(!f.serverKeys.verify(.close, by: .server, fields, mac: mac))
        #expect(!f.serverKeys.verify(.abort, by: .client, fields, mac: mac))
        #expect(!f.serverKeys.verify(.close, by: .client, fields, mac: Array(mac.prefix(31))))
        #expect(!f.serverKeys.verify(.close, by: .client, fields, mac: mac + [0]))
        #expect(!f.serverKeys.verify(.close, by: .client, fields + [4], mac: mac))
        #expect(constantTimeEqual([1, 2], [1, 2]))
        #expect(!constantTimeEqual([1, 2], [1, 3]))
        #expect(!constantTimeEqual([1, 2], [1]))
        #expect(randomBytes(16).count == 16)
        #expect(randomBytes(16) != randomBytes(16))
    }
}

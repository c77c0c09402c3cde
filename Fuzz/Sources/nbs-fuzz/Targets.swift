import NBSNetlink
import NBSProtocol
import NIOCore

/// One fuzz target per parser or state machine that reads bytes from the network or the kernel.
/// Each returns normally for any input; a trap (precondition, overflow, out-of-bounds) or a broken
/// invariant checked here is a finding.
enum FuzzTarget: String, CaseIterable {
    case frames
    case handshake
    case netlink
    case datagrams

    func run(_ bytes: UnsafeRawBufferPointer) {
        switch self {
        case .frames: fuzzFrames(bytes)
        case .handshake: fuzzHandshake(bytes)
        case .netlink: fuzzNetlink(bytes)
        case .datagrams: fuzzDatagrams(bytes)
        }
    }
}

/// The decoder over the input delivered in pieces (the first byte picks the piece size, as TCP
/// would split it), and every decoded frame must survive encode → decode unchanged.
func fuzzFrames(_ bytes: UnsafeRawBufferPointer) {
    guard let first = bytes.first else { return }
    let piece = Int(first % 64) + 1
    var decoder = FrameDecoder(expectPreamble: first & 0x80 != 0)
    var buffer = ByteBuffer()
    var offset = 1
    while offset < bytes.count {
        let end = min(bytes.count, offset + piece)
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[offset..<end]))
        offset = end
        while true {
            let frame: Frame?
            do { frame = try decoder.next(from: &buffer) } catch { return }
            guard let frame else { break }
            var encoded = ByteBuffer()
            FrameEncoder.encode(frame, into: &encoded)
            var again = FrameDecoder(expectPreamble: false)
            let decoded = try? again.next(from: &encoded)
            precondition(decoded == frame, "re-encoding changed \(frame.type)")
        }
    }
}

/// Keys of one genuine session, made once: the fuzzer plays an attacker who knows the handshake's
/// public parts but not the secret.
let genuine: (keys: SessionKeys, token: UInt64, transcript: HandshakeTranscript) = {
    let client = ClientHandshake(sourceName: "client.fuzz", destinationName: "server.fuzz", port: 7000)
    let (accept, keys) = try! ServerHandshake.accept(client.open, serverName: "server.fuzz", token: 0x1234_5678_9ABC_DEF0, receiveWindow: 1 << 20)
    return (keys, 0x1234_5678_9ABC_DEF0, HandshakeTranscript(open: client.open, accept: accept))
}()

/// Frames from the input, fed to a listener-side and an opener-side subflow state machine and to
/// the handshake and signal checks, as the engine does: nothing forged may authenticate.
func fuzzHandshake(_ bytes: UnsafeRawBufferPointer) {
    var decoder = FrameDecoder(expectPreamble: false)
    var buffer = ByteBuffer(bytes: bytes)
    var listener = SubflowStateMachine.listenerSide()
    var opener = SubflowStateMachine.openerSide(joining: false)
    var joins = JoinAuthenticator(keys: genuine.keys, token: genuine.token)
    var signals = SignalAuthenticator(keys: genuine.keys, localRole: .server)
    let client = ClientHandshake(sourceName: "client.fuzz", destinationName: "server.fuzz", port: 7000)
    for _ in 0..<64 {
        let frame: Frame?
        do { frame = try decoder.next(from: &buffer) } catch { return }
        guard let frame else { return }
        if case .identity(let proof) = frame {
            // Nobody but the holder of a key can sign this session's transcript with it.
            precondition(genuine.transcript.verify(proof, by: .client) == nil && genuine.transcript.verify(proof, by: .server) == nil,
                         "a forged IDENTITY verified")
            _ = SelfCertifyingName.matches("x.\(SelfCertifyingName.suffix)", publicKey: proof.publicKey)
        }
        switch listener.receive(frame) {
        case .handshake(.open(let open)):
            // Any OPEN must either give keys or a typed error; the keys then verify their own ACCEPT.
            if let (accept, _) = try? ServerHandshake.accept(open, serverName: "server.fuzz", token: 1, receiveWindow: 1 << 20) {
                precondition(accept.serverName == "server.fuzz")
            }
            listener.handshakeCompleted()
        case .handshake(.join(let join)):
            if case .accepted = joins.verify(join) { preconditionFailure("a forged JOIN authenticated") }
        case .session(let f):
            precondition(!signals.accept(f) || !isSignal(f), "a forged \(f.type) authenticated")
        default:
            break
        }
        if case .handshake(.accept(let accept)) = opener.receive(frame) {
            precondition((try? client.complete(with: accept)) == nil, "a forged ACCEPT authenticated")
        }
    }
}

func isSignal(_ frame: Frame) -> Bool {
    switch frame {
    case .addAddress, .removeAddress, .priority, .close: true
    default: false
    }
}

/// The netlink parser, and the interface table fed with whatever it accepted.
func fuzzNetlink(_ bytes: UnsafeRawBufferPointer) {
    guard let messages = try? parseNetlinkMessages(Array(bytes)) else { return }
    var table = InterfaceTable()
    _ = table.apply(messages)
    _ = table.usableAddresses
}

/// A genuine protected datagram from the opener of the `genuine` session: it makes a connection
/// take the session as established, after which nothing unauthenticated may reach it.
func genuineDatagram(number: UInt64) -> ByteBuffer {
    DatagramPacket(isProtected: true, connectionID: 77, packetNumber: number, controlBase: 0, items: [.ping], frames: [])
        .encode(key: genuine.keys.packetKey(sentBy: .client))
}

/// UDP subflow datagrams from the network. A datagram that parses must survive encode → decode
/// unchanged; each input goes to a connection without keys and to an established one. Nothing an
/// attacker without the session secret sends may reach the established one: no event, whatever the
/// bytes (a forged tag would need 2^128 tries).
func fuzzDatagrams(_ bytes: UnsafeRawBufferPointer) {
    let datagram = ByteBuffer(bytes: bytes)
    if let packet = try? DatagramPacket.decode(datagram) {
        let again = try? DatagramPacket.decode(packet.encode(key: nil))
        precondition(again == packet, "re-encoding changed a datagram")
    }
    let connectionID = DatagramPacket.peekConnectionID(datagram) ?? 77
    var fresh = DatagramConnection(connectionID: connectionID, isOpener: false)
    _ = fresh.receive(datagram, now: 1)
    _ = fresh.nextDatagram(now: 2)
    var established = DatagramConnection(connectionID: 77, isOpener: false)
    _ = established.installKeys(send: genuine.keys.packetKey(sentBy: .server), receive: genuine.keys.packetKey(sentBy: .client), now: 0)
    precondition(established.receive(genuineDatagram(number: 0), now: 1).authenticated, "the genuine datagram was refused")
    let result = established.receive(datagram, now: 2)
    precondition(result.events.isEmpty, "an unauthenticated datagram reached an established subflow: \(result.events)")
    _ = established.timeout(now: 3)
    _ = established.nextDatagram(now: 3)
}

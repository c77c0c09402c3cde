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

    func run(_ bytes: UnsafeRawBufferPointer) {
        switch self {
        case .frames: fuzzFrames(bytes)
        case .handshake: fuzzHandshake(bytes)
        case .netlink: fuzzNetlink(bytes)
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

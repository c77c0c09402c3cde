import Foundation
import NBSProtocol
import NIOCore

/// Valid inputs for each target, from the real encoders and authenticators, so the fuzzer starts
/// past the length and type checks. `NBS_FUZZ_WRITE_SEEDS=DIR nbs-fuzz` writes them to DIR/TARGET/
/// (the netlink seeds are the kernel captures of the unit tests; fuzz.sh extracts those).
enum Seeds {
    static func frames() -> [Frame] {
        let client = ClientHandshake(sourceName: "client.fuzz", destinationName: "server.fuzz", port: 7000)
        let (accept, keys) = try! ServerHandshake.accept(client.open, serverName: "server.fuzz", token: 42, receiveWindow: 1 << 20)
        var joins = JoinAuthenticator(keys: keys, token: 42)
        let join = joins.makeJoin(backup: true)
        var server = JoinAuthenticator(keys: keys, token: 42)
        guard case .accepted(let ack) = server.verify(join) else { fatalError("a genuine JOIN was refused") }
        var signals = SignalAuthenticator(keys: keys, localRole: .server)
        let v4 = WireAddress(bytes: [192, 0, 2, 1], port: 7000)!
        let v6 = WireAddress(bytes: [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [1], port: 0)!
        return [
            .open(client.open), .accept(accept), .join(join), .joinAck(ack),
            .data(.init(sequence: 1 << 40, payload: ByteBuffer(string: "hello, fuzzer"))),
            .dataAck(.init(cumulativeAck: 12345, window: 1 << 20)), .dataFin(.init(finalSequence: 99)),
            signals.addAddress(v4, id: 1), signals.addAddress(v6, id: 2), signals.removeAddress(v4), signals.priority(backup: true),
            .probe(.init(identifier: 7)), .probeAck(.init(identifier: 7)),
            signals.close(.normal, "bye", abort: false), signals.close(.protocolViolation, "no", abort: true),
            .identity(NBSIdentity().prove(HandshakeTranscript(open: client.open, accept: accept), as: .server)),
            // Last, so the indices above stay put: an OPEN that announces a window (admission at OPEN).
            .open(ClientHandshake(sourceName: "client.fuzz", destinationName: "server.fuzz", port: 7000, receiveWindow: 1 << 20).open),
        ]
    }

    static func encoded(_ frames: [Frame], preamble: Bool) -> [UInt8] {
        var buffer = ByteBuffer()
        if preamble { buffer.writeBytes(NBSWire.magic + [NBSWire.version, 0]) }
        for frame in frames { FrameEncoder.encode(frame, into: &buffer) }
        return Array(buffer.readableBytesView)
    }

    static func write(to directory: String) throws {
        let frames = frames()
        var inputs: [FuzzTarget: [[UInt8]]] = [:]
        // frames: first byte = piece size and whether a preamble leads.
        inputs[.frames] = frames.map { [0x3F] + encoded([$0], preamble: false) } + [[0xBF] + encoded(frames, preamble: true)]
        // handshake: the frame sequences a listener and an opener see.
        inputs[.handshake] = [encoded([frames[0], frames[5], frames[7], frames[13]], preamble: false), encoded([frames[2]], preamble: false),
                              encoded([frames[15], frames[1], frames[4]], preamble: false), encoded([frames[0], frames[15], frames[5]], preamble: false),
                              encoded(frames, preamble: false)]
        // datagrams: a full-sized OPEN, a bare ACK, and a protected datagram of the genuine session.
        var hello = DatagramConnection(connectionID: 77, isOpener: true)
        hello.queue(frames[0])
        var datagrams: [[UInt8]] = []
        if case .datagram(let d) = hello.nextDatagram(now: 0) { datagrams.append(Array(d.readableBytesView)) }
        datagrams.append(Array(DatagramPacket(isProtected: false, connectionID: 77, packetNumber: 3, controlBase: 0,
                                              items: [.ack(ranges: [5...9, 1...2], delayMicros: 10)], frames: []).encode(key: nil).readableBytesView))
        datagrams.append(Array(genuineDatagram(number: 5).readableBytesView))
        inputs[.datagrams] = datagrams
        for (target, seeds) in inputs {
            let dir = "\(directory)/\(target.rawValue)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            for (i, seed) in seeds.enumerated() {
                try Data(seed).write(to: URL(fileURLWithPath: "\(dir)/seed-\(i)"))
            }
        }
    }
}

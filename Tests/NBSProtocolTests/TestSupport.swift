import NIOCore
import Testing

@testable import NBSProtocol

/// A small, fast, seeded generator so that every randomised test is reproducible.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// True with probability `p`.
    mutating func chance(_ p: Double) -> Bool { Double.random(in: 0..<1, using: &self) < p }
}

/// Deterministic pseudo-random bytes, so a stream can be checked at any offset.
func patternBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    var out = [UInt8]()
    out.reserveCapacity(count + 8)
    while out.count < count {
        withUnsafeBytes(of: rng.next()) { out.append(contentsOf: $0) }
    }
    return Array(out.prefix(count))
}

func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

func bytes(of buffer: ByteBuffer) -> [UInt8] { Array(buffer.readableBytesView) }

func encoded(_ frame: Frame) -> ByteBuffer {
    var b = ByteBuffer()
    FrameEncoder.encode(frame, into: &b)
    return b
}

/// Frame bytes with an arbitrary header, for malformed-input tests.
func rawFrame(type: UInt8, flags: UInt8 = 0, payload: [UInt8], length: UInt32? = nil) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeInteger(type)
    b.writeInteger(flags)
    b.writeInteger(length ?? UInt32(payload.count))
    b.writeBytes(payload)
    return b
}

func preamble() -> ByteBuffer {
    var b = ByteBuffer()
    NBSWire.writePreamble(into: &b)
    return b
}

/// Decodes every complete frame in `buffer`.
func decodeAll(_ buffer: inout ByteBuffer, decoder: inout FrameDecoder) throws(FrameDecodingError) -> [Frame] {
    var frames: [Frame] = []
    while let frame = try decoder.next(from: &buffer) { frames.append(frame) }
    return frames
}

/// Sample frames of every type, including boundary sizes.
enum Samples {
    static let v4 = WireAddress(bytes: [192, 0, 2, 1], port: 443)!
    static let v4Max = WireAddress(bytes: [203, 0, 113, 255], port: .max)!
    static let v6 = WireAddress(bytes: [0x20, 0x01, 0x0D, 0xB8] + [UInt8](repeating: 0, count: 11) + [1], port: 8443)!
    static let v6Zero = WireAddress(bytes: [0x20, 0x01, 0x0D, 0xB8] + [UInt8](repeating: 0xFF, count: 12), port: 0)!

    static let key = patternBytes(NBSWire.publicKeyLength, seed: 1)
    static let nonce = patternBytes(NBSWire.nonceLength, seed: 2)
    static let mac = patternBytes(NBSWire.macLength, seed: 3)
    /// 253 bytes, the longest name the wire allows.
    static let longestName = String(repeating: "a", count: 253)
    /// 253 bytes of UTF-8 with multi-byte scalars.
    static let longestUnicodeName = String(repeating: "é", count: 126) + "x"

    static func frames(of type: FrameType) -> [Frame] {
        switch type {
        case .open:
            return [
                .open(.init(sourceName: "client.example", destinationName: "server.example", port: 443, publicKey: key, nonce: nonce)),
                .open(.init(sourceName: longestName, destinationName: longestUnicodeName, port: .max, publicKey: key, nonce: nonce)),
                .open(.init(sourceName: "a", destinationName: "b", port: 0, publicKey: key, nonce: nonce)),
            ]
        case .accept:
            return [
                .accept(.init(serverName: "server.example", token: 0x0102_0304_0506_0708, publicKey: key, nonce: nonce, receiveWindow: 65536, mac: mac)),
                .accept(.init(serverName: longestName, token: .max, publicKey: key, nonce: nonce, receiveWindow: .max, mac: mac)),
            ]
        case .join:
            return [
                .join(.init(token: 42, nonce: nonce, backup: false, mac: mac)),
                .join(.init(token: .max, nonce: nonce, backup: true, mac: mac)),
            ]
        case .joinAck:
            return [.joinAck(.init(nonce: nonce, mac: mac))]
        case .identity:
            return [.identity(.init(publicKey: key, signature: mac + mac))]
        case .data:
            return [
                .data(.init(sequence: 0, payload: buffer([7]))),
                .data(.init(sequence: 123_456_789, payload: buffer(patternBytes(1000, seed: 4)))),
                .data(.init(sequence: UInt64.max - UInt64(NBSWire.maxDataPayload), payload: buffer(patternBytes(NBSWire.maxDataPayload, seed: 5)))),
            ]
        case .dataAck:
            return [.dataAck(.init(cumulativeAck: 0, window: 0)), .dataAck(.init(cumulativeAck: .max, window: .max)),
                    .dataAck(.init(cumulativeAck: 7, window: 9, receivedOnSubflow: .max))]
        case .dataFin:
            return [.dataFin(.init(finalSequence: 0)), .dataFin(.init(finalSequence: .max))]
        case .addAddress:
            return [
                .addAddress(.init(addressID: 0, address: v4, sequence: 1, mac: mac)),
                .addAddress(.init(addressID: 255, address: v6, sequence: .max, mac: mac)),
                .addAddress(.init(addressID: 7, address: v4Max, sequence: 9, mac: mac)),
            ]
        case .removeAddress:
            return [
                .removeAddress(.init(address: v4, sequence: 2, mac: mac)),
                .removeAddress(.init(address: v6Zero, sequence: .max, mac: mac)),
            ]
        case .priority:
            return [.priority(.init(backup: true, sequence: 3, mac: mac)), .priority(.init(backup: false, sequence: 0, mac: mac))]
        case .interface:
            return [.interface(.init(tag: 1)), .interface(.init(tag: .max))]
        case .probe:
            return [.probe(.init(identifier: 0)), .probe(.init(identifier: .max))]
        case .probeAck:
            return [.probeAck(.init(identifier: 1)), .probeAck(.init(identifier: .max))]
        case .close:
            return [
                .close(.init(reason: .normal)),
                .close(.init(reason: .nameNotServed, message: "this listener serves other.example", mac: [])),
                .close(.init(reason: .shuttingDown, message: String(repeating: "z", count: NBSWire.maxReasonLength), mac: mac)),
                .close(.init(reason: .unknown, message: "ünïcödé", mac: mac)),
            ]
        case .abort:
            return [
                .abort(.init(reason: .protocolViolation)),
                .abort(.init(reason: .authenticationFailed, message: "bad MAC", mac: mac)),
                .abort(.init(reason: .applicationAbort, message: String(repeating: "é", count: 100), mac: [])),
            ]
        }
    }

    static var all: [Frame] { FrameType.allCases.flatMap(frames(of:)) }

    /// Small frames only (no 64 KiB DATA), for tests that are quadratic in frame size.
    static var small: [Frame] { all.filter { encoded($0).readableBytes < 2048 } }
}

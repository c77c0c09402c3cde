import NIOCore

/// Why bytes from a peer could not be decoded. Each case closes the subflow it came from.
public enum FrameDecodingError: Error, Equatable, Sendable, CustomStringConvertible {
    case badMagic
    case unsupportedVersion(UInt8)
    case unknownFrameType(UInt8)
    case frameTooLarge(type: UInt8, length: Int, limit: Int)
    case malformed(FrameType, String)

    public var description: String {
        switch self {
        case .badMagic: "not an NBS peer (bad magic)"
        case .unsupportedVersion(let v): "unsupported protocol version \(v)"
        case .unknownFrameType(let t): "unknown frame type 0x\(String(t, radix: 16))"
        case .frameTooLarge(let t, let length, let limit): "frame type 0x\(String(t, radix: 16)) of \(length) bytes exceeds limit \(limit)"
        case .malformed(let t, let why): "malformed \(t) frame: \(why)"
        }
    }

    public var closeReason: CloseReason {
        switch self {
        case .unsupportedVersion: .unsupportedVersion
        case .frameTooLarge: .resourceLimit
        default: .protocolViolation
        }
    }
}

public enum FrameEncoder {
    public static func encode(_ frame: Frame, into buffer: inout ByteBuffer) {
        let headerIndex = buffer.writerIndex
        buffer.writeInteger(frame.type.rawValue)
        buffer.writeInteger(flags(of: frame))
        buffer.writeInteger(UInt32(0))  // patched below
        let payloadStart = buffer.writerIndex
        writePayload(frame, into: &buffer)
        let length = UInt32(buffer.writerIndex - payloadStart)
        buffer.setInteger(length, at: headerIndex + 2)
    }

    /// DATA header alone, so a payload can be written after it without copying it into a frame.
    public static func encodeDataHeader(sequence: UInt64, payloadLength: Int, into buffer: inout ByteBuffer) {
        precondition(payloadLength <= NBSWire.maxDataPayload)
        buffer.writeInteger(FrameType.data.rawValue)
        buffer.writeInteger(UInt8(0))
        buffer.writeInteger(UInt32(8 + payloadLength))
        buffer.writeInteger(sequence)
    }

    private static func flags(of frame: Frame) -> UInt8 {
        switch frame {
        case .join(let j): j.backup ? NBSWire.backupFlag : 0
        case .priority(let p): p.backup ? NBSWire.backupFlag : 0
        case .open(let o): o.receiveWindow == nil ? 0 : NBSWire.openWindowFlag
        case .dataAck(let a): a.receivedOnSubflow == nil ? 0 : NBSWire.receivedFlag
        // Peers that predate IDENTITY skip it rather than fail, so it can be sent to any peer.
        case .identity: NBSWire.ignorableFlag
        // A scheduling hint: a peer that predates it loses nothing by skipping it.
        case .interface: NBSWire.ignorableFlag
        default: 0
        }
    }

    private static func writePayload(_ frame: Frame, into b: inout ByteBuffer) {
        switch frame {
        case .open(let o):
            b.writeInteger(o.version)
            writeName(o.sourceName, into: &b)
            writeName(o.destinationName, into: &b)
            b.writeInteger(o.port)
            b.writeBytes(o.publicKey)
            b.writeBytes(o.nonce)
            if let window = o.receiveWindow { b.writeInteger(window) }
        case .accept(let a):
            b.writeInteger(a.version)
            writeName(a.serverName, into: &b)
            b.writeInteger(a.token)
            b.writeBytes(a.publicKey)
            b.writeBytes(a.nonce)
            b.writeInteger(a.receiveWindow)
            b.writeBytes(a.mac)
        case .join(let j):
            b.writeInteger(j.token)
            b.writeBytes(j.nonce)
            b.writeBytes(j.mac)
        case .joinAck(let j):
            b.writeBytes(j.nonce)
            b.writeBytes(j.mac)
        case .identity(let i):
            b.writeBytes(i.publicKey)
            b.writeBytes(i.signature)
        case .data(let d):
            b.writeInteger(d.sequence)
            var payload = d.payload
            b.writeBuffer(&payload)
        case .dataAck(let a):
            b.writeInteger(a.cumulativeAck)
            b.writeInteger(a.window)
            if let received = a.receivedOnSubflow { b.writeInteger(received) }
        case .dataFin(let f):
            b.writeInteger(f.finalSequence)
        case .addAddress(let a):
            b.writeInteger(a.addressID)
            writeAddress(a.address, into: &b)
            b.writeInteger(a.sequence)
            b.writeBytes(a.mac)
        case .removeAddress(let r):
            writeAddress(r.address, into: &b)
            b.writeInteger(r.sequence)
            b.writeBytes(r.mac)
        case .priority(let p):
            b.writeInteger(p.sequence)
            b.writeBytes(p.mac)
        case .interface(let i):
            b.writeInteger(i.tag)
        case .probe(let p), .probeAck(let p):
            b.writeInteger(p.identifier)
        case .close(let c), .abort(let c):
            b.writeInteger(c.reason.rawValue)
            let message = Array(truncatedUTF8(c.message, maxBytes: NBSWire.maxReasonLength).utf8)
            b.writeInteger(UInt8(message.count))
            b.writeBytes(message)
            b.writeInteger(UInt8(c.mac.count))
            b.writeBytes(c.mac)
        }
    }

    private static func writeName(_ name: String, into b: inout ByteBuffer) {
        let bytes = Array(truncatedUTF8(name, maxBytes: NBSWire.maxNameLength).utf8)
        b.writeInteger(UInt8(bytes.count))
        b.writeBytes(bytes)
    }

    private static func writeAddress(_ a: WireAddress, into b: inout ByteBuffer) {
        b.writeInteger(UInt8(a.isIPv4 ? 4 : 6))
        b.writeBytes(a.bytes)
        b.writeInteger(a.port)
    }
}

/// Incremental decoder. It never consumes a partial frame, except a DATA frame's payload when
/// `streamsData` is set, and rejects a too-long frame from its header alone, so a peer cannot make
/// it buffer more than one maximal frame.
public struct FrameDecoder: Sendable {
    public enum Expectation: Sendable { case preamble, frames }
    public private(set) var expectation: Expectation
    /// A byte stream's decoder (TCP) may hand on a DATA frame's payload in pieces as it arrives,
    /// each piece a DATA frame of its own sequence and length: the bytes stay slices of the reads
    /// they came in, instead of being copied together when a frame spans two reads. A datagram's
    /// decoder sees whole frames only.
    public let streamsData: Bool
    /// The DATA frame whose payload is arriving: where its next byte belongs and how many are due.
    private var dataInProgress: (sequence: UInt64, remaining: Int)?

    public init(expectPreamble: Bool = true, streamsData: Bool = false) {
        self.expectation = expectPreamble ? .preamble : .frames
        self.streamsData = streamsData
    }

    /// Returns nil when more bytes are needed.
    public mutating func next(from buffer: inout ByteBuffer) throws(FrameDecodingError) -> Frame? {
        if expectation == .preamble {
            guard let ok = try Self.checkPreamble(buffer) else { return nil }
            _ = ok
            buffer.moveReaderIndex(forwardBy: NBSWire.preambleLength)
            expectation = .frames
        }
        if let progress = dataInProgress {
            guard buffer.readableBytes > 0 else { return nil }
            return takeData(at: progress.sequence, remaining: progress.remaining, from: &buffer)
        }
        while true {
            guard let header = try Self.header(in: buffer) else { return nil }
            guard buffer.readableBytes >= NBSWire.frameHeaderLength + header.length else {
                guard streamsPieces(of: header), buffer.readableBytes >= Self.firstPieceLength else { return nil }
                buffer.moveReaderIndex(forwardBy: NBSWire.frameHeaderLength)
                let sequence: UInt64 = buffer.readInteger()!
                return takeData(at: sequence, remaining: header.length - Self.sequenceLength, from: &buffer)
            }
            guard let type = FrameType(rawValue: header.rawType) else {
                if header.flags & NBSWire.ignorableFlag != 0 {
                    buffer.moveReaderIndex(forwardBy: NBSWire.frameHeaderLength + header.length)
                    continue
                }
                throw .unknownFrameType(header.rawType)
            }
            buffer.moveReaderIndex(forwardBy: NBSWire.frameHeaderLength)
            var payload = buffer.readSlice(length: header.length)!
            return try Self.parse(type, flags: header.flags, payload: &payload)
        }
    }

    private static let sequenceLength = 8
    /// What a streamed DATA frame's first piece needs: its header, its sequence and a payload byte.
    private static let firstPieceLength = NBSWire.frameHeaderLength + sequenceLength + 1

    /// Whether the frame `header` announces may be handed on before it is whole: a DATA frame,
    /// on a decoder that streams, long enough to hold a sequence and payload (a shorter one is
    /// malformed, and waits to be refused whole).
    private func streamsPieces(of header: (rawType: UInt8, flags: UInt8, length: Int)) -> Bool {
        streamsData && header.rawType == FrameType.data.rawValue && header.length > Self.sequenceLength
    }

    /// A piece of a streamed DATA frame: as much of its `remaining` payload as `buffer` holds.
    private mutating func takeData(at sequence: UInt64, remaining: Int, from buffer: inout ByteBuffer) -> Frame {
        let length = min(remaining, buffer.readableBytes)
        let piece = buffer.readSlice(length: length)!
        dataInProgress = length == remaining ? nil : (sequence &+ UInt64(length), remaining - length)
        return .data(.init(sequence: sequence, payload: piece))
    }

    /// The next frame's header, without consuming it; nil until all of it has arrived. A length over
    /// the type's limit throws here, from the header alone.
    private static func header(in buffer: ByteBuffer) throws(FrameDecodingError) -> (rawType: UInt8, flags: UInt8, length: Int)? {
        guard buffer.readableBytes >= NBSWire.frameHeaderLength,
            let rawType: UInt8 = buffer.getInteger(at: buffer.readerIndex),
            let flags: UInt8 = buffer.getInteger(at: buffer.readerIndex + 1),
            let length: UInt32 = buffer.getInteger(at: buffer.readerIndex + 2)
        else { return nil }
        let limit = FrameType(rawValue: rawType)?.maxPayload ?? NBSWire.maxControlPayload
        guard Int(length) <= limit else { throw .frameTooLarge(type: rawType, length: Int(length), limit: limit) }
        return (rawType, flags, Int(length))
    }

    /// How many more bytes `buffer` needs before `next` can return the next preamble or frame
    /// (0: it can now). A header that announces too long a frame throws, as `next` would.
    public func bytesMissing(in buffer: ByteBuffer) throws(FrameDecodingError) -> Int {
        if expectation == .preamble { return max(0, NBSWire.preambleLength - buffer.readableBytes) }
        if dataInProgress != nil { return buffer.readableBytes > 0 ? 0 : 1 }
        guard let header = try Self.header(in: buffer) else { return NBSWire.frameHeaderLength - buffer.readableBytes }
        let whole = NBSWire.frameHeaderLength + header.length
        let needed = streamsPieces(of: header) ? min(whole, Self.firstPieceLength) : whole
        return max(0, needed - buffer.readableBytes)
    }

    /// nil: not enough bytes yet. Throws when the bytes cannot be an NBS preamble, which is how a
    /// listener tells a legacy client apart.
    public static func checkPreamble(_ buffer: ByteBuffer) throws(FrameDecodingError) -> Bool? {
        let available = min(buffer.readableBytes, NBSWire.preambleLength)
        let bytes = buffer.getBytes(at: buffer.readerIndex, length: available) ?? []
        for (i, byte) in bytes.prefix(NBSWire.magic.count).enumerated() where byte != NBSWire.magic[i] {
            throw .badMagic
        }
        guard available == NBSWire.preambleLength else { return nil }
        guard bytes[4] == NBSWire.version else { throw .unsupportedVersion(bytes[4]) }
        return true
    }

    static func parse(_ type: FrameType, flags: UInt8, payload p: inout ByteBuffer) throws(FrameDecodingError) -> Frame {
        var r = PayloadReader(type: type, buffer: p)
        let frame: Frame
        switch type {
        case .open:
            let version = try r.u8()
            guard version == NBSWire.version else { throw .unsupportedVersion(version) }
            frame = .open(.init(version: version, sourceName: try r.name(), destinationName: try r.name(), port: try r.u16(),
                                publicKey: try r.bytes(NBSWire.publicKeyLength), nonce: try r.bytes(NBSWire.nonceLength),
                                receiveWindow: flags & NBSWire.openWindowFlag != 0 ? try r.u32() : nil))
        case .accept:
            let version = try r.u8()
            guard version == NBSWire.version else { throw .unsupportedVersion(version) }
            frame = .accept(.init(version: version, serverName: try r.name(), token: try r.u64(), publicKey: try r.bytes(NBSWire.publicKeyLength),
                                  nonce: try r.bytes(NBSWire.nonceLength), receiveWindow: try r.u32(), mac: try r.bytes(NBSWire.macLength)))
        case .join:
            frame = .join(.init(token: try r.u64(), nonce: try r.bytes(NBSWire.nonceLength), backup: flags & NBSWire.backupFlag != 0,
                                mac: try r.bytes(NBSWire.macLength)))
        case .joinAck:
            frame = .joinAck(.init(nonce: try r.bytes(NBSWire.nonceLength), mac: try r.bytes(NBSWire.macLength)))
        case .identity:
            frame = .identity(.init(publicKey: try r.bytes(NBSWire.identityKeyLength), signature: try r.bytes(NBSWire.signatureLength)))
        case .data:
            let sequence = try r.u64()
            guard r.buffer.readableBytes > 0 else { throw .malformed(.data, "empty payload") }
            let payload = r.buffer.readSlice(length: r.buffer.readableBytes)!
            frame = .data(.init(sequence: sequence, payload: payload))
        case .dataAck:
            frame = .dataAck(.init(cumulativeAck: try r.u64(), window: try r.u32(),
                                   receivedOnSubflow: flags & NBSWire.receivedFlag != 0 ? try r.u64() : nil))
        case .dataFin:
            frame = .dataFin(.init(finalSequence: try r.u64()))
        case .addAddress:
            frame = .addAddress(.init(addressID: try r.u8(), address: try r.address(), sequence: try r.u32(), mac: try r.bytes(NBSWire.macLength)))
        case .removeAddress:
            frame = .removeAddress(.init(address: try r.address(), sequence: try r.u32(), mac: try r.bytes(NBSWire.macLength)))
        case .priority:
            frame = .priority(.init(backup: flags & NBSWire.backupFlag != 0, sequence: try r.u32(), mac: try r.bytes(NBSWire.macLength)))
        case .interface:
            frame = .interface(.init(tag: try r.u32()))
        case .probe:
            frame = .probe(.init(identifier: try r.u64()))
        case .probeAck:
            frame = .probeAck(.init(identifier: try r.u64()))
        case .close, .abort:
            let reason = CloseReason(rawValue: try r.u16()) ?? .unknown
            let messageLength = Int(try r.u8())
            guard messageLength <= NBSWire.maxReasonLength else { throw .malformed(type, "reason text too long") }
            guard let message = String(validating: try r.bytes(messageLength), as: UTF8.self) else {
                throw .malformed(type, "reason text is not UTF-8")
            }
            let macLength = Int(try r.u8())
            guard macLength == 0 || macLength == NBSWire.macLength else { throw .malformed(type, "bad MAC length \(macLength)") }
            let close = Frame.Close(reason: reason, message: message, mac: try r.bytes(macLength))
            frame = type == .close ? .close(close) : .abort(close)
        }
        guard r.buffer.readableBytes == 0 else { throw .malformed(type, "\(r.buffer.readableBytes) trailing bytes") }
        return frame
    }
}

/// The longest prefix of `text` that fits in `maxBytes` of UTF-8 without splitting a character.
public func truncatedUTF8(_ text: String, maxBytes: Int) -> String {
    guard text.utf8.count > maxBytes else { return text }
    var result = ""
    var used = 0
    for character in text {
        let size = character.utf8.count
        guard used + size <= maxBytes else { break }
        result.append(character)
        used += size
    }
    return result
}

struct PayloadReader {
    let type: FrameType
    var buffer: ByteBuffer

    mutating func u8() throws(FrameDecodingError) -> UInt8 { try int() }
    mutating func u16() throws(FrameDecodingError) -> UInt16 { try int() }
    mutating func u32() throws(FrameDecodingError) -> UInt32 { try int() }
    mutating func u64() throws(FrameDecodingError) -> UInt64 { try int() }

    private mutating func int<T: FixedWidthInteger>() throws(FrameDecodingError) -> T {
        guard let v: T = buffer.readInteger() else { throw .malformed(type, "truncated") }
        return v
    }

    mutating func bytes(_ n: Int) throws(FrameDecodingError) -> [UInt8] {
        guard let b = buffer.readBytes(length: n) else { throw .malformed(type, "truncated") }
        return b
    }

    mutating func name() throws(FrameDecodingError) -> String {
        let length = Int(try u8())
        guard length <= NBSWire.maxNameLength else { throw .malformed(type, "name longer than \(NBSWire.maxNameLength)") }
        let raw = try bytes(length)
        guard let name = String(validating: raw, as: UTF8.self), !name.isEmpty else {
            throw .malformed(type, "name is empty or not UTF-8")
        }
        return name
    }

    mutating func address() throws(FrameDecodingError) -> WireAddress {
        let family = try u8()
        let length: Int
        switch family {
        case 4: length = 4
        case 6: length = 16
        default: throw .malformed(type, "address family \(family)")
        }
        let raw = try bytes(length)
        return WireAddress(bytes: raw, port: try u16())!
    }
}

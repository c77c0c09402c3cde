import Crypto
import NIOCore

/// The datagram format of UDP subflows (docs/PROTOCOL.md, "UDP subflows"). Each datagram carries a
/// connection ID that names the subflow whatever address it comes from (so a NAT rebinding is
/// followed), a packet number that is never reused (acknowledgements and replay protection), the
/// transport's own items (ACK ranges, PING, path checks, shutdown, reset) and ordinary NBS frames.
/// Once the session secret is known every datagram is authenticated: a truncated HMAC-SHA256 over
/// all of it, under a key per direction, checked before anything in it touches state.
public enum DatagramWire {
    public static let unprotectedForm: UInt8 = 0x4E  // "N": handshake frames, no session key yet
    public static let protectedForm: UInt8 = 0x50  // "P": authenticated with the session's packet key
    /// form, connection ID, packet number, control base, transport items length.
    public static let headerLength = 1 + 8 + 8 + 4 + 2
    public static let tagLength = 16
    /// Every subflow starts with datagrams that fit the IPv6 minimum MTU (1280) less IPv6 and UDP
    /// headers, so no path fragments them; QUIC makes the same choice. Larger sizes are probed
    /// for (`PathMTUSearch`).
    public static let baseDatagramSize = 1200
    /// The largest datagram a subflow sends or receives: what its probes may try, and what a
    /// socket's read buffer holds. On loopback (MTU 65,536) this is the limit; on Ethernet the
    /// path's 1,500 is.
    public static let largestDatagramSize = 16 * 1024
    /// Datagrams that open a subflow (OPEN, JOIN) are padded to this size, and a listener ignores
    /// shorter ones: its answer is then never larger than what a spoofed source made it receive,
    /// so it cannot amplify an attack on that source.
    public static let minimumHelloSize = 1200
    public static let maxAckRanges = 32
    /// Room a DATA frame's payload has in a protected datagram of `size` that also carries a full
    /// ACK item.
    public static func maxDataPayload(datagramSize size: Int) -> Int {
        size - headerLength - tagLength - NBSWire.frameHeaderLength - 8 - 3 - 64
    }
}

/// The transport's own items, carried ahead of the frames of a datagram.
public enum DatagramItem: Sendable, Equatable {
    /// Received packet numbers, newest range first; `delayMicros` is how long the receiver held
    /// the acknowledgement, so it is not counted as round-trip time.
    case ack(ranges: [ClosedRange<UInt64>], delayMicros: UInt32)
    case ping
    case pathChallenge(UInt64)
    case pathResponse(UInt64)
    /// No more frames from this end of the subflow (TCP's FIN); ordered after every control frame.
    case shutdown
    /// The subflow is closed (TCP's RST).
    case reset
    /// Filler that makes OPEN and JOIN datagrams full-sized.
    case padding(Int)

    var rawType: UInt8 {
        switch self {
        case .ack: 1
        case .ping: 2
        case .pathChallenge: 3
        case .pathResponse: 4
        case .shutdown: 5
        case .reset: 6
        case .padding: 7
        }
    }

    var isPadding: Bool {
        if case .padding = self { true } else { false }
    }

    var encodedLength: Int {
        switch self {
        case .ack(let ranges, _): 3 + 4 + 1 + 16 * ranges.count
        case .ping, .shutdown, .reset: 3
        case .pathChallenge, .pathResponse: 3 + 8
        case .padding(let n): 3 + n
        }
    }

    func encode(into buffer: inout ByteBuffer) {
        buffer.writeInteger(rawType)
        buffer.writeInteger(UInt16(encodedLength - 3))
        switch self {
        case .ack(let ranges, let delay):
            buffer.writeInteger(delay)
            buffer.writeInteger(UInt8(ranges.count))
            for range in ranges {
                buffer.writeInteger(range.upperBound)
                buffer.writeInteger(range.lowerBound)
            }
        case .pathChallenge(let v), .pathResponse(let v):
            buffer.writeInteger(v)
        case .padding(let n):
            buffer.writeRepeatingByte(0, count: n)
        case .ping, .shutdown, .reset:
            break
        }
    }
}

public enum DatagramError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncated
    case unknownForm(UInt8)
    case badItem(String)
    case badFrames(FrameDecodingError)
    case tooLarge(Int)

    public var description: String {
        switch self {
        case .truncated: "truncated datagram"
        case .unknownForm(let f): "unknown datagram form 0x\(String(f, radix: 16))"
        case .badItem(let why): "malformed transport item: \(why)"
        case .badFrames(let e): "malformed frames: \(e)"
        case .tooLarge(let n): "datagram of \(n) bytes is larger than any NBS datagram"
        }
    }
}

/// One datagram, parsed but not yet authenticated or interpreted.
public struct DatagramPacket: Sendable, Equatable {
    public var isProtected: Bool
    public var connectionID: UInt64
    public var packetNumber: UInt64
    /// Control sequence number of the first ordered item in the datagram (the next one the sender
    /// would assign, when the datagram holds none).
    public var controlBase: UInt32
    public var items: [DatagramItem]
    public var frames: [Frame]

    public init(isProtected: Bool, connectionID: UInt64, packetNumber: UInt64, controlBase: UInt32, items: [DatagramItem], frames: [Frame]) {
        self.isProtected = isProtected
        self.connectionID = connectionID
        self.packetNumber = packetNumber
        self.controlBase = controlBase
        self.items = items
        self.frames = frames
    }

    /// The connection ID alone, for demultiplexing before anything else is looked at.
    public static func peekConnectionID(_ datagram: ByteBuffer) -> UInt64? {
        guard datagram.readableBytes >= DatagramWire.headerLength,
            let form: UInt8 = datagram.getInteger(at: datagram.readerIndex),
            form == DatagramWire.unprotectedForm || form == DatagramWire.protectedForm
        else { return nil }
        return datagram.getInteger(at: datagram.readerIndex + 1)
    }

    public func encode(key: SymmetricKey?, allocator: ByteBufferAllocator = .init()) -> ByteBuffer {
        let itemsLength = items.reduce(0) { $0 + $1.encodedLength }
        var buffer = allocator.buffer(capacity: DatagramWire.headerLength + itemsLength + 64 + DatagramWire.tagLength)
        buffer.writeInteger(isProtected ? DatagramWire.protectedForm : DatagramWire.unprotectedForm)
        buffer.writeInteger(connectionID)
        buffer.writeInteger(packetNumber)
        buffer.writeInteger(controlBase)
        buffer.writeInteger(UInt16(itemsLength))
        for item in items { item.encode(into: &buffer) }
        for frame in frames { FrameEncoder.encode(frame, into: &buffer) }
        if isProtected, let key { Self.appendTag(to: &buffer, key: key) }
        return buffer
    }

    static func appendTag(to buffer: inout ByteBuffer, key: SymmetricKey) {
        let tag = buffer.withUnsafeReadableBytes { HMAC<SHA256>.authenticationCode(for: $0, using: key) }
        tag.withUnsafeBytes { buffer.writeBytes($0.prefix(DatagramWire.tagLength)) }
    }

    /// Checks a protected datagram's tag; returns the datagram without it, or nil if it fails.
    public static func authenticate(_ datagram: ByteBuffer, key: SymmetricKey) -> ByteBuffer? {
        let length = datagram.readableBytes - DatagramWire.tagLength
        guard length >= DatagramWire.headerLength else { return nil }
        let body = datagram.getSlice(at: datagram.readerIndex, length: length)!
        let expected = body.withUnsafeReadableBytes { HMAC<SHA256>.authenticationCode(for: $0, using: key) }
        let received = datagram.getBytes(at: datagram.readerIndex + length, length: DatagramWire.tagLength)!
        let ok = expected.withUnsafeBytes { constantTimeEqual(Array($0.prefix(DatagramWire.tagLength)), received) }
        return ok ? body : nil
    }

    /// Parses a datagram whose tag (if any) has been checked and removed.
    public static func decode(_ body: ByteBuffer) throws(DatagramError) -> DatagramPacket {
        var b = body
        guard b.readableBytes <= DatagramWire.largestDatagramSize else { throw .tooLarge(b.readableBytes) }
        guard let form: UInt8 = b.readInteger(), let cid: UInt64 = b.readInteger(), let pn: UInt64 = b.readInteger(),
            let base: UInt32 = b.readInteger(), let itemsLength: UInt16 = b.readInteger()
        else { throw .truncated }
        guard form == DatagramWire.unprotectedForm || form == DatagramWire.protectedForm else { throw .unknownForm(form) }
        guard var itemBytes = b.readSlice(length: Int(itemsLength)) else { throw .truncated }
        var items: [DatagramItem] = []
        while itemBytes.readableBytes > 0 {
            guard let type: UInt8 = itemBytes.readInteger(), let length: UInt16 = itemBytes.readInteger(),
                var value = itemBytes.readSlice(length: Int(length))
            else { throw .badItem("truncated item") }
            switch type {
            case 1:
                guard let delay: UInt32 = value.readInteger(), let count: UInt8 = value.readInteger(),
                    count >= 1, Int(count) <= DatagramWire.maxAckRanges, value.readableBytes == 16 * Int(count)
                else { throw .badItem("ACK") }
                var ranges: [ClosedRange<UInt64>] = []
                for _ in 0..<count {
                    let high: UInt64 = value.readInteger()!
                    let low: UInt64 = value.readInteger()!
                    guard low <= high, ranges.last.map({ low < $0.lowerBound && high < $0.lowerBound }) ?? true else { throw .badItem("ACK ranges out of order") }
                    ranges.append(low...high)
                }
                items.append(.ack(ranges: ranges, delayMicros: delay))
            case 2, 5, 6:
                guard value.readableBytes == 0 else { throw .badItem("item \(type) has a body") }
                items.append(type == 2 ? .ping : type == 5 ? .shutdown : .reset)
            case 3, 4:
                guard value.readableBytes == 8, let v: UInt64 = value.readInteger() else { throw .badItem("path check length") }
                items.append(type == 3 ? .pathChallenge(v) : .pathResponse(v))
            case 7:
                items.append(.padding(value.readableBytes))
            default:
                throw .badItem("unknown item type \(type)")
            }
        }
        var decoder = FrameDecoder(expectPreamble: false)
        var frames: [Frame] = []
        do {
            while b.readableBytes > 0 {
                guard let frame = try decoder.next(from: &b) else { throw DatagramError.truncated }
                frames.append(frame)
            }
        } catch let error as FrameDecodingError {
            throw .badFrames(error)
        } catch {
            throw .truncated
        }
        return DatagramPacket(isProtected: form == DatagramWire.protectedForm, connectionID: cid, packetNumber: pn,
                              controlBase: base, items: items, frames: frames)
    }
}

extension Frame {
    /// Frames that set up a subflow; they travel in unprotected datagrams, the only frames that do
    /// (with ABORT, for a refusal before there is a key).
    var isHandshake: Bool {
        switch self {
        case .open, .accept, .join, .joinAck, .identity: true
        default: false
        }
    }

    /// Delivered once each and in order on a UDP subflow, as TCP would: everything but data,
    /// acknowledgements, DATA_FIN and probes, which the session handles in any order.
    var isOrderedOnDatagrams: Bool {
        switch self {
        case .data, .dataAck, .dataFin, .probe, .probeAck: false
        default: true
        }
    }
}

extension SessionKeys {
    /// The key that authenticates every datagram `sender` sends on UDP subflows.
    public func packetKey(sentBy sender: Role) -> SymmetricKey {
        let code = HMAC<SHA256>.authenticationCode(for: Array("NBS-1 datagrams".utf8), using: key(for: sender))
        return SymmetricKey(data: Array(code))
    }
}

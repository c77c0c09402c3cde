import NIOCore

/// Constants of the NBS wire format, version 1. `docs/PROTOCOL.md` is the normative description;
/// every number here appears there.
public enum NBSWire {
    /// Every subflow starts, in each direction, with this preamble so that an NBS peer can be told
    /// from a legacy TCP peer by its first bytes.
    public static let magic: [UInt8] = [0x4E, 0x42, 0x53, 0x21]  // "NBS!"
    public static let version: UInt8 = 1
    public static let preambleLength = 6  // magic, version, reserved

    /// type (1) + flags (1) + payload length (4, big endian)
    public static let frameHeaderLength = 6

    /// Bounds that keep a peer from making us buffer unbounded amounts before a frame is complete.
    public static let maxDataPayload = 64 * 1024
    public static let maxControlPayload = 1024
    public static let maxNameLength = 253
    public static let maxReasonLength = 200

    public static let nonceLength = 16
    public static let publicKeyLength = 32
    public static let macLength = 32
    /// Ed25519 public (and private) key and signature sizes, for IDENTITY.
    public static let identityKeyLength = 32
    public static let signatureLength = 64

    /// Flag bit on any frame type: a receiver that does not know the type may skip the frame.
    public static let ignorableFlag: UInt8 = 0x80
    /// Flag bit on ACCEPT/JOIN/JOIN_ACK/PRIO: the subflow is a backup.
    public static let backupFlag: UInt8 = 0x01
    /// Flag bit on OPEN: a receive window follows the nonce, and the opener sends no IDENTITY.
    public static let openWindowFlag: UInt8 = 0x02
    /// Flag bit on DATA_ACK: the bytes received on this subflow follow the window.
    public static let receivedFlag: UInt8 = 0x01

    public static func writePreamble(into buffer: inout ByteBuffer) {
        buffer.writeBytes(magic)
        buffer.writeInteger(version)
        buffer.writeInteger(UInt8(0))
    }
}

public enum FrameType: UInt8, Sendable, CaseIterable {
    case open = 0x01
    case accept = 0x02
    case join = 0x03
    case joinAck = 0x04
    case identity = 0x05
    case data = 0x10
    case dataAck = 0x11
    case dataFin = 0x12
    case addAddress = 0x20
    case removeAddress = 0x21
    case priority = 0x22
    case interface = 0x23
    case probe = 0x30
    case probeAck = 0x31
    case close = 0x40
    case abort = 0x41

    var maxPayload: Int {
        switch self {
        case .data: 8 + NBSWire.maxDataPayload
        // Fixed size: a longer header is refused before any of it is buffered.
        case .identity: NBSWire.identityKeyLength + NBSWire.signatureLength
        default: NBSWire.maxControlPayload
        }
    }
}

/// Why a session or subflow was closed or refused; carried in CLOSE and ABORT.
public enum CloseReason: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case normal = 0
    case nameNotServed = 1
    case unsupportedVersion = 2
    case unknownToken = 3
    case authenticationFailed = 4
    case tooManySubflows = 5
    case protocolViolation = 6
    case resourceLimit = 7
    case timeout = 8
    case applicationAbort = 9
    case replay = 10
    case shuttingDown = 11
    /// The peer's name is not verified to the level this side requires (or a pinned or
    /// self-certifying name was claimed without proving its key).
    case verificationFailed = 12
    case unknown = 0xFFFF

    public var description: String {
        switch self {
        case .normal: "normal close"
        case .nameNotServed: "name not served by this listener"
        case .unsupportedVersion: "unsupported protocol version"
        case .unknownToken: "unknown session token"
        case .authenticationFailed: "authentication failed"
        case .tooManySubflows: "too many subflows"
        case .protocolViolation: "protocol violation"
        case .resourceLimit: "resource limit reached"
        case .timeout: "timeout"
        case .applicationAbort: "aborted by the application"
        case .replay: "replayed message"
        case .shuttingDown: "shutting down"
        case .verificationFailed: "peer name verification failed"
        case .unknown: "unknown reason"
        }
    }
}

/// An IP address as carried on the wire: 4 or 16 bytes.
public struct WireAddress: Hashable, Sendable, CustomStringConvertible {
    public var bytes: [UInt8]
    public var port: UInt16

    public init?(bytes: [UInt8], port: UInt16) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
        self.port = port
    }

    public var isIPv4: Bool { bytes.count == 4 }

    public var description: String {
        if isIPv4 {
            return bytes.map(String.init).joined(separator: ".") + ":\(port)"
        }
        var groups: [String] = []
        for i in stride(from: 0, to: 16, by: 2) {
            groups.append(String(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]), radix: 16))
        }
        return "[" + groups.joined(separator: ":") + "]:\(port)"
    }
}

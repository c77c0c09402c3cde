import NIOCore

/// One NBS frame. Field order and sizes are given in docs/PROTOCOL.md.
public enum Frame: Sendable, Equatable {
    case open(Open)
    case accept(Accept)
    case join(Join)
    case joinAck(JoinAck)
    case identity(Identity)
    case data(Data)
    case dataAck(DataAck)
    case dataFin(DataFin)
    case addAddress(AddAddress)
    case removeAddress(RemoveAddress)
    case priority(Priority)
    case interface(Interface)
    case probe(Probe)
    case probeAck(Probe)
    case close(Close)
    case abort(Close)

    public var type: FrameType {
        switch self {
        case .open: .open
        case .accept: .accept
        case .join: .join
        case .joinAck: .joinAck
        case .identity: .identity
        case .data: .data
        case .dataAck: .dataAck
        case .dataFin: .dataFin
        case .addAddress: .addAddress
        case .removeAddress: .removeAddress
        case .priority: .priority
        case .interface: .interface
        case .probe: .probe
        case .probeAck: .probeAck
        case .close: .close
        case .abort: .abort
        }
    }

    /// First frame of the first subflow, client to server.
    public struct Open: Sendable, Equatable {
        public var version: UInt8
        public var sourceName: String
        public var destinationName: String
        public var port: UInt16
        public var publicKey: [UInt8]  // X25519, 32 bytes
        public var nonce: [UInt8]  // 16 bytes
        /// Set by an opener that will send no IDENTITY (flag `openWindowFlag`): nothing it sends
        /// after ACCEPT can change the listener's verdict, so the listener may admit the session at
        /// OPEN and send up to this window at once, which saves the set-up a round trip.
        public var receiveWindow: UInt32?
        public init(version: UInt8 = NBSWire.version, sourceName: String, destinationName: String, port: UInt16, publicKey: [UInt8], nonce: [UInt8],
                    receiveWindow: UInt32? = nil) {
            self.version = version
            self.sourceName = sourceName
            self.destinationName = destinationName
            self.port = port
            self.publicKey = publicKey
            self.nonce = nonce
            self.receiveWindow = receiveWindow
        }
    }

    /// Server's answer to OPEN. `mac` proves the server derived the same session secret.
    public struct Accept: Sendable, Equatable {
        public var version: UInt8
        public var serverName: String
        public var token: UInt64
        public var publicKey: [UInt8]
        public var nonce: [UInt8]
        public var receiveWindow: UInt32
        public var mac: [UInt8]
        public init(version: UInt8 = NBSWire.version, serverName: String, token: UInt64, publicKey: [UInt8], nonce: [UInt8], receiveWindow: UInt32, mac: [UInt8]) {
            self.version = version
            self.serverName = serverName
            self.token = token
            self.publicKey = publicKey
            self.nonce = nonce
            self.receiveWindow = receiveWindow
            self.mac = mac
        }
    }

    /// First frame of every further subflow.
    public struct Join: Sendable, Equatable {
        public var token: UInt64
        public var nonce: [UInt8]
        public var backup: Bool
        public var mac: [UInt8]
        public init(token: UInt64, nonce: [UInt8], backup: Bool, mac: [UInt8]) {
            self.token = token
            self.nonce = nonce
            self.backup = backup
            self.mac = mac
        }
    }

    public struct JoinAck: Sendable, Equatable {
        public var nonce: [UInt8]
        public var mac: [UInt8]
        public init(nonce: [UInt8], mac: [UInt8]) {
            self.nonce = nonce
            self.mac = mac
        }
    }

    /// Proof of an Ed25519 identity: `signature` over the handshake transcript (HandshakeTranscript).
    public struct Identity: Sendable, Equatable {
        public var publicKey: [UInt8]  // Ed25519, 32 bytes
        public var signature: [UInt8]  // 64 bytes
        public init(publicKey: [UInt8], signature: [UInt8]) {
            self.publicKey = publicKey
            self.signature = signature
        }
    }

    public struct Data: Sendable, Equatable {
        public var sequence: UInt64
        public var payload: ByteBuffer
        public init(sequence: UInt64, payload: ByteBuffer) {
            self.sequence = sequence
            self.payload = payload
        }
    }

    public struct DataAck: Sendable, Equatable {
        /// Every byte below this data sequence number has been received (a DATA_FIN counts as one).
        public var cumulativeAck: UInt64
        /// The sender may send data up to cumulativeAck + window.
        public var window: UInt32
        /// DATA payload bytes received on the subflow this frame travels on, since it began (a
        /// TCP subflow only; flag `NBSWire.receivedFlag`). They arrived in the order they were
        /// sent, so the sender knows which of its segments there the receiver holds, also beyond
        /// a gap in the stream.
        public var receivedOnSubflow: UInt64?
        public init(cumulativeAck: UInt64, window: UInt32, receivedOnSubflow: UInt64? = nil) {
            self.cumulativeAck = cumulativeAck
            self.window = window
            self.receivedOnSubflow = receivedOnSubflow
        }
    }

    public struct DataFin: Sendable, Equatable {
        /// The stream ends at this sequence number: the last byte is finalSequence - 1.
        public var finalSequence: UInt64
        public init(finalSequence: UInt64) { self.finalSequence = finalSequence }
    }

    public struct AddAddress: Sendable, Equatable {
        public var addressID: UInt8
        public var address: WireAddress
        public var sequence: UInt32
        public var mac: [UInt8]
        public init(addressID: UInt8, address: WireAddress, sequence: UInt32, mac: [UInt8]) {
            self.addressID = addressID
            self.address = address
            self.sequence = sequence
            self.mac = mac
        }
    }

    public struct RemoveAddress: Sendable, Equatable {
        public var address: WireAddress
        public var sequence: UInt32
        public var mac: [UInt8]
        public init(address: WireAddress, sequence: UInt32, mac: [UInt8]) {
            self.address = address
            self.sequence = sequence
            self.mac = mac
        }
    }

    public struct Priority: Sendable, Equatable {
        public var backup: Bool
        public var sequence: UInt32
        public var mac: [UInt8]
        public init(backup: Bool, sequence: UInt32, mac: [UInt8]) {
            self.backup = backup
            self.sequence = sequence
            self.mac = mac
        }
    }

    /// Which of the sender's interfaces this subflow leaves by, as a tag that means something only
    /// within the session (equal tags: the same interface). The receiver groups subflows that share
    /// both ends' interfaces, and so most likely one bottleneck; a hint, not a command.
    public struct Interface: Sendable, Equatable {
        public var tag: UInt32
        public init(tag: UInt32) { self.tag = tag }
    }

    public struct Probe: Sendable, Equatable {
        public var identifier: UInt64
        public init(identifier: UInt64) { self.identifier = identifier }
    }

    /// CLOSE (graceful, after both DATA_FINs) and ABORT (immediate) share a layout.
    public struct Close: Sendable, Equatable {
        public var reason: CloseReason
        public var message: String
        /// Empty before the session secret exists (a refused OPEN or JOIN); otherwise authenticated.
        public var mac: [UInt8]
        public init(reason: CloseReason, message: String = "", mac: [UInt8] = []) {
            self.reason = reason
            self.message = message
            self.mac = mac
        }
    }
}

import Logging
import NBSProtocol
import NIOCore
import NIOPosix

/// A listener's UDP side: wildcard sockets that hear new subflows (a full-sized datagram with OPEN
/// or JOIN) and datagrams of known subflows arriving from a new address (NAT rebinding), matched
/// by connection ID. Everything else is dropped before it costs anything but the parse of a header.
final class DatagramListener {
    private let loop: any EventLoop
    private let state: ListenerState
    private let options: NBSOptions
    private var subflows: [UInt64: DatagramSubflow] = [:]
    private var touched: [DatagramSubflow] = []
    private var localSockets: [String: EventLoopFuture<any Channel>] = [:]
    private(set) var dropped = 0
    private var isClosed = false
    private let logger = Logger(label: "nbs.udp.listener")

    init(loop: any EventLoop, state: ListenerState, options: NBSOptions) {
        self.loop = loop
        self.state = state
        self.options = options
    }

    var subflowCount: Int { subflows.count }

    /// Binds `address` (a wildcard, one of `bindAddresses`, or a local address openers send to) and
    /// starts hearing on it.
    static func bind(_ address: SocketAddress, listener: NIOLoopBound<DatagramListener>, on loop: any EventLoop) -> EventLoopFuture<any Channel> {
        DatagramSubflow.openSocket(on: loop, bind: address, connect: nil, reuseAddress: true, sharedByListener: true).flatMapThrowing { channel in
            // Past net.core.rmem_max where allowed (CAP_NET_ADMIN), else the 4 MiB asked already.
            _ = try? channel.syncOptions?.setOption(.socketOption(.init(rawValue: SO_RCVBUFFORCE)), value: sharedReceiveBuffer)
            let inbound = try channel.pipeline.syncOperations.handler(type: DatagramInbound.self)
            let port = channel.localAddress?.port ?? address.port ?? 0
            inbound.onDatagram = { envelope in listener.value.received(envelope, port: port) }
            inbound.onReadComplete = { listener.value.readComplete() }
            return channel
        }
    }

    /// Every subflow to an address shares its socket, so one loop's pause meets all their bursts at
    /// once: with 10,000 sessions, the 4 MiB asked (8 in the kernel's count) overflowed within a
    /// second of the serve's loop falling behind.
    static let sharedReceiveBuffer = 32 << 20

    private func received(_ envelope: AddressedEnvelope<ByteBuffer>, port: Int) {
        let datagram = envelope.data
        guard let connectionID = DatagramPacket.peekConnectionID(datagram) else { return drop() }
        if let subflow = subflows[connectionID] {
            subflow.receive(datagram, from: envelope.remoteAddress)
            touched.append(subflow)
            return
        }
        // A new subflow: an unauthenticated OPEN or JOIN, padded to full size so that our answer is
        // never larger than what the (possibly spoofed) source sent.
        guard !isClosed, datagram.readableBytes >= DatagramWire.minimumHelloSize, subflows.count < options.maxDatagramSubflows,
            state.canTakeHandshake,
            let packet = try? DatagramPacket.decode(datagram), !packet.isProtected,
            let first = packet.frames.first, first.type == .open || first.type == .join,
            let destination = envelope.metadata?.packetInfo?.destinationAddress
        else { return drop() }
        let local = destination.unmapped.withPort(port)
        let subflow = DatagramSubflow(loop: loop, local: local, remote: envelope.remoteAddress, connectionID: connectionID,
                                      isOpener: false, options: options)
        subflows[connectionID] = subflow
        subflow.onClosed = { [weak self] closed in
            guard let self else { return }
            if subflows[closed.connection.connectionID] === closed { subflows[closed.connection.connectionID] = nil }
            if isClosed, subflows.isEmpty { closeLocalSockets() }
        }
        state.newConnection(subflow)
        subflow.receive(datagram, from: envelope.remoteAddress)
        touched.append(subflow)
        // Our datagrams leave from the address the opener chose, whatever the routing table says.
        let bound = NIOLoopBound(subflow, eventLoop: loop)
        socket(for: local).whenComplete { result in
            switch result {
            case .success(let channel): bound.value.attachShared(channel)
            case .failure(let error): bound.value.socketFailed(error)
            }
        }
    }

    /// The socket bound to `local` (this listener's port on one of its addresses), made when a
    /// subflow first needs it. Every subflow to that address shares it; it is not connected, so
    /// an ICMP error from one peer does not close it for the others.
    private func socket(for local: SocketAddress) -> EventLoopFuture<any Channel> {
        let key = local.hostString
        if let existing = localSockets[key] { return existing }
        let bound = NIOLoopBound(self, eventLoop: loop)
        let future = Self.bind(local, listener: bound, on: loop).flatMapThrowing { channel in
            try channel.pipeline.syncOperations.handler(type: DatagramInbound.self).onInactive = { bound.value.localSocketClosed(key) }
            return channel
        }
        localSockets[key] = future
        future.whenFailure { _ in bound.value.localSockets[key] = nil }
        return future
    }

    /// NIO closes a UDP socket on a send error such as ENETUNREACH, which one peer (or the forged
    /// source of a hello) can cause: the socket is opened again for the others at once. If that
    /// fails, the address itself is gone, and so are its subflows.
    private func localSocketClosed(_ key: String) {
        localSockets[key] = nil
        let affected = subflows.values.filter { $0.local.hostString == key }
        guard !isClosed, let local = affected.first?.local else {
            for subflow in affected { subflow.sharedSocketClosed() }
            return
        }
        let bound = NIOLoopBound(affected, eventLoop: loop)
        socket(for: local).whenComplete { result in
            switch result {
            case .success(let channel): for subflow in bound.value { subflow.attachShared(channel) }
            case .failure: for subflow in bound.value { subflow.sharedSocketClosed() }
            }
        }
    }

    /// The listener stopped: sessions already accepted keep the sockets of their addresses until
    /// their last subflow ends.
    func close() {
        isClosed = true
        if subflows.isEmpty { closeLocalSockets() }
    }

    private func closeLocalSockets() {
        for future in localSockets.values { future.whenSuccess { $0.close(promise: nil) } }
        localSockets.removeAll()
    }

    private func readComplete() {
        let batch = touched
        touched.removeAll(keepingCapacity: true)
        for subflow in batch { subflow.readComplete() }
    }

    private func drop() { dropped += 1 }

    /// Test hook: the subflow a connection ID names.
    func subflowForTesting(_ connectionID: UInt64) -> DatagramSubflow? { subflows[connectionID] }
}

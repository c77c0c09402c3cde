import NBSProtocol
import NIOCore
import NIOPosix

/// Socket set-up shared by every subflow, opened or accepted.
enum SubflowConnector {
    /// TCP_NOTSENT_LOWAT (Linux): the kernel holds at most this much unsent data per subflow, so
    /// the scheduler, not a deep socket buffer, decides which path carries the next segment, and
    /// little is stranded on a path that dies.
    static let notSentLowWatermark = 32 * 1024
    static let tcpNotSentLowat = NIOBSDSocket.Option(rawValue: 25)
    /// TCP_FASTOPEN (listener: the length of its queue of connections accepted from a SYN) and
    /// TCP_FASTOPEN_CONNECT (opener: with the server's cookie cached, connect returns at once and
    /// the first write leaves in the SYN).
    static let tcpFastOpen = NIOBSDSocket.Option(rawValue: 23)
    static let tcpFastOpenConnect = NIOBSDSocket.Option(rawValue: 30)
    /// TCP_RTO_MIN_US (Linux 6.15): an accepted socket inherits its listener's. A kernel without
    /// it refuses the option, and its own floor stays.
    static let tcpMinimumRTO = NIOBSDSocket.Option(rawValue: 45)

    /// `NBSOptions.tcpMinimumRTO` as TCP_RTO_MIN_US takes it: microseconds.
    static func minimumRTOValue(_ rto: TimeAmount) -> SocketOptionValue {
        SocketOptionValue(max(1, min(rto.nanoseconds / 1000, Int64(Int32.max))))
    }

    /// Until the subflow's delivery rate is known (`SessionEngine.resizeQueues`, about 150 ms
    /// after its data starts): 50 ms of a 10 Mbit/s path.
    static let writeWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 32 * 1024, high: 64 * 1024)
    /// Large reads under load: fewer system calls and fewer read batches (each may trigger a
    /// DATA_ACK); the size doubles after every read that fills the buffer, so 2 KiB reaches 1 MiB
    /// within ten reads. Small when idle: NIO keeps each channel's receive buffer for reuse, and
    /// starting at 256 KiB cost about 540 KiB of resident memory per idle two-subflow session.
    static let receiveAllocator = AdaptiveRecvByteBufferAllocator(minimum: 2048, initial: 2048, maximum: 1024 * 1024)

    /// Options and handlers of every subflow, opened or accepted.
    static func configure(_ channel: any Channel) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            try setSocketOptionsSync(channel)
            try addSubflowHandlers(channel)
        }
    }

    /// The socket options alone: legacy sessions and connections not classified yet share them.
    static func setSocketOptions(_ channel: any Channel) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture { try setSocketOptionsSync(channel) }
    }

    static func setSocketOptionsSync(_ channel: any Channel) throws {
        let options = channel.syncOptions!
        try options.setOption(.allowRemoteHalfClosure, value: true)
        try options.setOption(.tcpOption(.tcp_nodelay), value: 1)
        try options.setOption(.tcpOption(tcpNotSentLowat), value: notSentLowWatermark)
        try options.setOption(.writeBufferWaterMark, value: writeWaterMark)
        try options.setOption(.recvAllocator, value: receiveAllocator)
    }

    static func addSubflowHandlers(_ channel: any Channel) throws {
        let sync = channel.pipeline.syncOperations
        try sync.addHandler(FrameReader())
        try sync.addHandler(SubflowHandler())
    }

    /// `prepare` runs on the channel's loop before the connection is up, so that nothing the peer
    /// sends first can arrive before the handlers that must see it.
    static func connect(on loop: any EventLoop, from local: SocketAddress, to remote: SocketAddress, options: NBSOptions,
                        prepare: (@Sendable (any Channel) throws -> Void)? = nil) -> EventLoopFuture<any Channel> {
        ClientBootstrap(group: loop)
            .connectTimeout(options.connectTimeout)
            .channelInitializer { channel in
                configure(channel).flatMapThrowing {
                    // A kernel without Fast Open refuses the option; the connect is a plain one then.
                    if options.tcpFastOpen { try? channel.syncOptions!.setOption(.tcpOption(tcpFastOpenConnect), value: 1) }
                    if let rto = options.tcpMinimumRTO {
                        try? channel.syncOptions!.setOption(.tcpOption(tcpMinimumRTO), value: minimumRTOValue(rto))
                    }
                    let handler = try channel.pipeline.syncOperations.handler(type: SubflowHandler.self)
                    handler.sendsPreambleOnConnect = true
                    handler.connectedTo = remote
                    try prepare?(channel)
                }
            }
            .bind(to: local)
            .connect(to: remote)
    }

    /// How long an opener waits for its handshake (OPEN to ACCEPT and verdict, or JOIN to JOIN_ACK).
    /// A Fast Open connect returns before its SYN leaves, so `connectTimeout` never runs for it and a
    /// SYN sent again (after 1 and 3 s) would eat into the handshake's time: it gets both.
    static func handshakeBudget(_ options: NBSOptions, connectDeferred: Bool) -> TimeAmount {
        connectDeferred ? options.handshakeTimeout + options.connectTimeout : options.handshakeTimeout
    }

    /// A further subflow (a JOIN) on the session's transport.
    static func connectTransport(on loop: any EventLoop, from local: SocketAddress, to remote: SocketAddress,
                                 options: NBSOptions) -> EventLoopFuture<NIOLoopBound<any SubflowTransport>> {
        switch options.transport {
        case .tcp:
            return connect(on: loop, from: local, to: remote, options: options).flatMapThrowing { channel in
                NIOLoopBound(try channel.pipeline.syncOperations.handler(type: SubflowHandler.self), eventLoop: loop)
            }
        case .udp:
            return DatagramSubflow.connect(on: loop, from: local, to: remote, options: options) { _ in }.map {
                NIOLoopBound($0, eventLoop: loop)
            }
        }
    }
}

extension ByteBuffer {
    /// A small read in a large receive buffer, copied out: kept as it is, it would hold the whole
    /// buffer alive while it waits for the application, so that memory would no longer be bounded
    /// by receiveCapacity.
    func copiedOutIfSmall(allocator: ByteBufferAllocator) -> ByteBuffer {
        readableBytes < capacity / 4 ? allocator.buffer(buffer: self) : self
    }
}

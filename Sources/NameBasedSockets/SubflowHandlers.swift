#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NBSProtocol
import NIOCore

/// Bytes to frames, via the pure FrameDecoder, without copying DATA payloads: frames are parsed in
/// the buffer each read delivers and payloads are slices of it. Only a frame split across two
/// reads is copied, so at most one frame per read (ByteToMessageHandler would copy every read into
/// its cumulation buffer while slices of the previous one are alive).
final class FrameReader: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Frame

    /// DATA is streamed: a frame that spans two reads reaches the engine as two pieces, each a
    /// slice of its read, rather than copied together here (2-4 % of loopback's CPU when it was).
    private var decoder = FrameDecoder(expectPreamble: true, streamsData: true)
    /// The start of a control frame, DATA header or preamble whose end has not arrived yet.
    private var carry: ByteBuffer?
    private var failed = false
    /// NIO reads again from inside a flush when a write fails on a reset connection (it drains what
    /// the socket still holds), so channelRead can be re-entered while a frame passed on from here is
    /// being handled (the engine flushes its DATA_ACK there). The nested read's bytes come later in
    /// the stream than those this call has yet to parse, so they wait and are parsed after them.
    /// Parsed at once, they began mid-frame and their bytes were taken for a frame header. What NIO
    /// reports after such a read (read complete, end of input, inactive, an error) waits behind
    /// them too, so the engine never learns that a subflow ended before it has its last frames.
    private var reading = false
    /// An Array, not a CircularBuffer: an empty one allocates nothing, and this is empty for all but
    /// moments in a subflow's life (a CircularBuffer here cost 1.4 KiB per idle session: 28.6 against
    /// 27.2 KiB, bench-scale.sh --sessions 9960).
    private var nested: [Nested] = []

    private enum Nested {
        case bytes(ByteBuffer)
        case readComplete
        case event(Any)
        case error(any Error)
        case inactive
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = Self.unwrapInboundIn(data)
        guard !reading else { return nested.append(.bytes(bytes)) }
        reading = true
        parse(bytes, context: context)
        while !nested.isEmpty {
            let next = nested.removeFirst()
            switch next {
            case .bytes(let more): parse(more, context: context)
            case .readComplete: context.fireChannelReadComplete()
            case .event(let event): context.fireUserInboundEventTriggered(event)
            case .error(let error): context.fireErrorCaught(error)
            case .inactive: context.fireChannelInactive()
            }
        }
        reading = false
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard !reading else { return nested.append(.readComplete) }
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard !reading else { return nested.append(.event(event)) }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard !reading else { return nested.append(.error(error)) }
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        guard !reading else { return nested.append(.inactive) }
        context.fireChannelInactive()
    }

    private func parse(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        guard !failed else { return }
        var incoming = bytes
        do {
            while var partial = carry {
                let missing = try decoder.bytesMissing(in: partial)
                if missing > 0 {
                    guard incoming.readableBytes > 0 else {
                        carry = partial
                        return
                    }
                    var piece = incoming.readSlice(length: min(missing, incoming.readableBytes))!
                    partial.writeBuffer(&piece)
                    carry = partial
                    continue  // the header may be complete now, and tell how much more is needed
                }
                if let frame = try decoder.next(from: &partial) { context.fireChannelRead(Self.wrapInboundOut(frame)) }
                carry = partial.readableBytes > 0 ? partial : nil
            }
            while let frame = try decoder.next(from: &incoming) {
                context.fireChannelRead(Self.wrapInboundOut(frame))
            }
            if incoming.readableBytes > 0 {
                // Copy the tail so the big read buffer is not kept alive for it. It is at most a
                // control frame: DATA leaves only its header here.
                var tail = context.channel.allocator.buffer(capacity: NBSWire.frameHeaderLength + NBSWire.maxControlPayload)
                tail.writeBuffer(&incoming)
                carry = tail
            }
        } catch {
            failed = true
            carry = nil
            context.fireErrorCaught(error)
        }
    }
}

/// One subflow's transport as the session engine and the listener see it: TCP (`SubflowHandler`,
/// a channel handler) or UDP (`DatagramSubflow`). Everything TCP-specific (socket options, TCP_INFO,
/// FIN and RST) is behind it. Always used on the subflow's event loop.
protocol SubflowTransport: AnyObject {
    var id: SubflowID { get set }
    /// Strong: a subflow keeps its session alive. The engine breaks the cycle when it ends.
    var delegate: (any SubflowDelegate)? { get set }
    /// When this side sent OPEN or JOIN, for the first RTT sample.
    var handshakeSentAt: NIODeadline? { get set }
    var isWritable: Bool { get }
    var localAddress: SocketAddress? { get }
    var remoteAddress: SocketAddress? { get }
    /// The largest DATA payload one transmission may carry; nil when the transport cuts for itself.
    var maxDataPayload: Int? { get }
    /// A UDP subflow's datagram size (`SubflowInfo.datagramSize`); nil for a byte stream.
    var datagramSize: Int? { get }
    /// A byte stream (TCP): what was sent arrives in that order (`SessionCore.addSubflow`).
    var deliversInOrder: Bool { get }
    /// Whether the peer has shown that it receives at its address: TCP's handshake shows it; a UDP
    /// subflow knows it only from an authenticated datagram. Until then a listener sends no more than
    /// its one-datagram answer to a hello there, whose source may be forged (no amplification).
    var peerAddressConfirmed: Bool { get }
    /// Opener side: TCP Fast Open let the connect return before the SYN left; the SYN goes with
    /// the first frame, so the handshake's wait includes TCP's own (`SubflowConnector.handshakeBudget`).
    var connectDeferred: Bool { get }
    func write(_ frame: Frame, flush: Bool)
    func writeData(sequence: UInt64, payload: ByteBuffer)
    func flush()
    /// Sends `frame` (typically ABORT or CLOSE), then closes.
    func writeAndClose(_ frame: Frame?)
    /// Abortive close: the peer learns of it in one trip across the path, ahead of anything queued.
    func resetAndClose()
    /// Graceful end: the peer learns after everything queued; its own end completes the close.
    func shutdownOutput()
    /// The session's keys, once the handshake has them (UDP authenticates every datagram with them).
    func installKeys(_ keys: SessionKeys, localRole: SessionKeys.Role)
    /// What the transport knows of the path: for stall detection and queue sizing.
    func progress() -> EventLoopFuture<SubflowProgress>?
    /// The same, when the transport knows it without asking the kernel (UDP): nil means ask `progress()`.
    var currentProgress: SubflowProgress? { get }
    /// Roughly how much may wait in the transport beyond what is in flight.
    func setQueueLimit(_ bytes: Int)
    /// When the socket this subflow shares with others kept datagrams waiting past a wake-up's
    /// reads (`DatagramInbound`); nil where the socket is the subflow's own.
    var readBacklog: LoopLag? { get }
    /// The session's engine took the subflow on: its handshake, the opener's wait for the
    /// listener's verdict included, is over.
    func joinedSession()
}

extension SubflowTransport {
    func joinedSession() {}
    var currentProgress: SubflowProgress? { nil }
    var readBacklog: LoopLag? { nil }
    var connectDeferred: Bool { false }
    func write(_ frame: Frame) { write(frame, flush: true) }
    /// Who the subflow is, for logs.
    var peerDescription: String { remoteAddress?.description ?? "?" }
}

/// What a subflow reports; implemented by the session engine and, before a session exists, by the
/// listener and the opener's first attempt. Always called on the subflow's event loop.
protocol SubflowDelegate: AnyObject {
    func subflow(_ subflow: any SubflowTransport, received frame: Frame)
    func subflowReadComplete(_ subflow: any SubflowTransport)
    func subflowWritabilityChanged(_ subflow: any SubflowTransport, writable: Bool)
    /// The subflow put bytes on the wire that its transport will see acknowledged (a flush, a
    /// datagram other than ACKs alone): the engine watches for stalls again.
    func subflowSent(_ subflow: any SubflowTransport)
    func subflowInputClosed(_ subflow: any SubflowTransport)
    func subflowClosed(_ subflow: any SubflowTransport, error: (any Error)?)
    /// A UDP subflow lost a datagram that carried these bytes of the session.
    func subflow(_ subflow: any SubflowTransport, lostDataAt sequence: UInt64, length: Int)
    /// A UDP subflow's peer now sends from another address (a NAT rebinding), checked.
    func subflow(_ subflow: any SubflowTransport, peerMovedFrom old: SocketAddress, to new: SocketAddress)
}

extension SubflowDelegate {
    func subflowSent(_ subflow: any SubflowTransport) {}
    func subflow(_ subflow: any SubflowTransport, lostDataAt sequence: UInt64, length: Int) {}
    func subflow(_ subflow: any SubflowTransport, peerMovedFrom old: SocketAddress, to new: SocketAddress) {}
}

/// The last handler of every subflow pipeline. Owns no protocol logic: it forwards to its
/// delegate and writes what it is told to.
final class SubflowHandler: ChannelInboundHandler, SubflowTransport {
    typealias InboundIn = Frame
    typealias OutboundOut = ByteBuffer

    var delegate: (any SubflowDelegate)?
    var handshakeSentAt: NIODeadline?
    private(set) var context: ChannelHandlerContext?
    private var firstError: (any Error)?
    private var reportedClosed = false
    var id = SubflowID(0)
    var preambleSent = false
    /// Opener side: send the preamble as soon as TCP is up, from the event loop, rather than with
    /// the first frame. A listener takes a client that stays silent for legacyDetectionDelay for a
    /// legacy one; an opener busy with hundreds of handshakes (key generation, task hops) can take
    /// longer than that to produce its OPEN, but never to write four bytes on connect.
    var sendsPreambleOnConnect = false
    /// Opener side: the address connected to. A Fast Open connect returns before the SYN leaves, so
    /// NIO finds no peer to cache; this stands in for it.
    var connectedTo: SocketAddress?
    private(set) var connectDeferred = false

    init() {}

    var channel: (any Channel)? { context?.channel }
    var isWritable: Bool { context?.channel.isWritable ?? false }
    var isActive: Bool { context?.channel.isActive ?? false }
    var localAddress: SocketAddress? { context?.channel.localAddress }
    var remoteAddress: SocketAddress? { context?.channel.remoteAddress ?? connectedTo }
    var maxDataPayload: Int? { nil }
    var datagramSize: Int? { nil }
    var deliversInOrder: Bool { true }
    var peerAddressConfirmed: Bool { true }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelActive(context: ChannelHandlerContext) {
        // Without a peer address the connect was deferred by Fast Open: the SYN leaves with the
        // first write, so the preamble waits to go in it with the OPEN (or JOIN), and the listener
        // sees no connection before that.
        if sendsPreambleOnConnect { connectDeferred = context.channel.remoteAddress == nil }
        if sendsPreambleOnConnect, !preambleSent, !connectDeferred {
            var buffer = context.channel.allocator.buffer(capacity: NBSWire.preambleLength)
            ensurePreamble(into: &buffer)
            context.writeAndFlush(Self.wrapOutboundOut(buffer), promise: nil)
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        delegate?.subflow(self, received: Self.unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        delegate?.subflowReadComplete(self)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        delegate?.subflowWritabilityChanged(self, writable: context.channel.isWritable)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelEvent, case .inputClosed = event as! ChannelEvent {
            delegate?.subflowInputClosed(self)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if firstError == nil { firstError = error }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        reportClosed()
    }

    private func reportClosed() {
        guard !reportedClosed else { return }
        reportedClosed = true
        delegate?.subflowClosed(self, error: firstError)
    }

    // MARK: writing

    private func ensurePreamble(into buffer: inout ByteBuffer) {
        if !preambleSent {
            NBSWire.writePreamble(into: &buffer)
            preambleSent = true
        }
    }

    func write(_ frame: Frame, flush: Bool) {
        guard let context else { return }
        var buffer = context.channel.allocator.buffer(capacity: 64)
        ensurePreamble(into: &buffer)
        FrameEncoder.encode(frame, into: &buffer)
        context.write(Self.wrapOutboundOut(buffer), promise: nil)
        if flush { self.flush() }
    }

    func writeData(sequence: UInt64, payload: ByteBuffer) {
        guard let context else { return }
        var header = context.channel.allocator.buffer(capacity: 20)
        ensurePreamble(into: &header)
        FrameEncoder.encodeDataHeader(sequence: sequence, payloadLength: payload.readableBytes, into: &header)
        context.write(Self.wrapOutboundOut(header), promise: nil)
        context.write(Self.wrapOutboundOut(payload), promise: nil)
    }

    func flush() {
        guard let context else { return }
        context.flush()
        delegate?.subflowSent(self)
    }

    /// Closes once `frame` is on the wire.
    func writeAndClose(_ frame: Frame?) {
        guard let context else { return }
        // An opener's connection with nothing on it yet gets the preamble first, so that the
        // listener sees an NBS connection that ended, not a silent legacy client to hand to its
        // application (a Happy Eyeballs loser closes this way).
        let announce = sendsPreambleOnConnect && !preambleSent && !connectDeferred && context.channel.isActive
        let channel = context.channel
        guard frame != nil || announce else { return closeOnNextTick(channel) }
        var buffer = channel.allocator.buffer(capacity: 64)
        ensurePreamble(into: &buffer)
        if let frame { FrameEncoder.encode(frame, into: &buffer) }
        context.writeAndFlush(Self.wrapOutboundOut(buffer)).whenComplete { _ in closeOnNextTick(channel) }
    }

    /// A TCP reset goes out at once, ahead of whatever is still queued, so the peer learns of the
    /// close in one trip across the path rather than after the queue drains.
    func resetAndClose() {
        guard let channel = context?.channel else { return }
        resetOnNextTick(channel)
    }

    /// FIN after what is queued; the peer's FIN completes the close.
    func shutdownOutput() {
        guard let context else { return }
        context.flush()
        context.close(mode: .output, promise: nil)
    }

    /// TCP carries no keys: its frames authenticate themselves where they must.
    func installKeys(_ keys: SessionKeys, localRole: SessionKeys.Role) {}

    func progress() -> EventLoopFuture<SubflowProgress>? {
        if let progressForTesting, let channel { return channel.eventLoop.makeSucceededFuture(progressForTesting) }
        return (channel as? any SocketOptionProvider)?.getKernelTCPInfo().map(SubflowProgress.init)
    }

    /// Test hook: what `progress()` reports instead of TCP_INFO (a path that died, without root
    /// to blackhole one).
    var progressForTesting: SubflowProgress?

    /// The channel's write buffer and the kernel's unsent queue (TCP_NOTSENT_LOWAT).
    func setQueueLimit(_ bytes: Int) {
        guard let channel else { return }
        channel.setOption(.writeBufferWaterMark, value: .init(low: bytes / 2, high: bytes)).whenComplete { _ in }
        channel.setOption(.tcpOption(SubflowConnector.tcpNotSentLowat), value: max(4 * 1024, bytes / 2)).whenComplete { _ in }
    }
}

/// Closes the channel from a fresh event-loop task, never from inside the pipeline event being
/// handled. A channel closed from channelReadComplete while NIO handles an end of input trips
/// NIO's `isRegisteredFully` assertion (debug builds): NIO goes on to half-close the input of a
/// channel that is gone. Found by the soak scenario (200 sessions closing at once).
func closeOnNextTick(_ channel: any Channel) {
    channel.eventLoop.execute { channel.close(promise: nil) }
}

/// Abortive close (SO_LINGER 0: a TCP reset, queued data dropped), by way of `closeOnNextTick`.
func resetOnNextTick(_ channel: any Channel) {
    let lingerZero = (channel as? any SocketOptionProvider)?.setSoLinger(linger(l_onoff: 1, l_linger: 0)) ?? channel.eventLoop.makeSucceededVoidFuture()
    lingerZero.whenComplete { _ in closeOnNextTick(channel) }
}

import NBSProtocol
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Telling an NBS peer from a legacy one by the first bytes it sends, or by its silence. Pure:
/// the channel handler that feeds it is `FirstBytesClassifier`.
///
/// - A listener's client is NBS once the 4 magic bytes have arrived; any byte that differs makes
///   it legacy at once; a client that sends nothing (it waits for a banner) or ends its side before
///   the magic is complete is legacy once the detection delay has passed or its input ended.
/// - An opener's server is NBS when it answers with the preamble and then anything but OPEN. An
///   OPEN right after the preamble is our own OPEN coming back: an echo server. A server that
///   answers with other bytes, closes without a byte, or stays silent is legacy.
public enum LegacyDetection {
    public enum Side: Sendable { case listener, opener }

    public enum Verdict: Sendable, Equatable {
        case undecided
        case nbs
        /// Not NBS: the bytes differ from the preamble, or the peer was silent or closed.
        case legacy
        /// The opener's own preamble and OPEN came back.
        case echo
    }

    /// Bytes needed before the verdict on an NBS-looking peer can be `.nbs`.
    static func bytesNeeded(_ side: Side) -> Int {
        side == .listener ? NBSWire.magic.count : NBSWire.preambleLength + 1
    }

    public static func classify(_ bytes: some Collection<UInt8>, side: Side, silentTooLong: Bool = false, inputEnded: Bool = false) -> Verdict {
        for (byte, expected) in zip(bytes, NBSWire.magic) where byte != expected { return .legacy }
        if bytes.count >= bytesNeeded(side) {
            guard side == .opener else { return .nbs }
            let type = bytes[bytes.index(bytes.startIndex, offsetBy: NBSWire.preambleLength)]
            return type == FrameType.open.rawValue ? .echo : .nbs
        }
        return silentTooLong || inputEnded ? .legacy : .undecided
    }
}

/// First handler of a connection whose kind is not known yet: holds the first reads (the verdict
/// comes by the 4th or 7th byte, so rarely more than one) and the end of input until `LegacyDetection`
/// decides, lets `decide` arrange the pipeline after it, then passes on what it held (unless told
/// to drop it) and removes itself.
final class FirstBytesClassifier: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Evidence: Sendable, Equatable {
        /// The peer sent bytes that settle it (for `.legacy`: bytes that are not NBS).
        case bytes
        case silence
        case closed
    }

    struct Outcome {
        var verdict: LegacyDetection.Verdict
        var evidence: Evidence
        var firstBytes: ByteBuffer
        /// How long silence was waited for, when it decided.
        var waited: TimeAmount?
    }

    enum Disposition {
        /// Pass the held bytes (and an end of input) to the handlers `decide` installed.
        case forward
        /// The connection is being closed or replaced; what it sent is of no use.
        case drop
    }

    private let side: LegacyDetection.Side
    /// nil: silence never decides (an NBS-only opener leaves that to its handshake timeout).
    private let silence: TimeAmount?
    private let connectTimes: Int64
    private let decide: (Outcome, ChannelHandlerContext) -> Disposition
    private var held: ByteBuffer?
    private var inputEnded = false
    private var decided = false
    private var addedAt = NIODeadline.now()
    /// The silence timer is armed; it is never cancelled (NIO's cancellation is a linear search of
    /// its heap) and does nothing once the classifier decided or left the pipeline.
    private var timerArmed = false
    private var removed = false
    /// The silence a peer is allowed, and how long it has been waited for in all (more, when the
    /// kernel showed the peer could not have heard us in time).
    private var wait: TimeAmount?
    private var waited: TimeAmount?
    private var silenceRechecks = 0
    private var retransmissionGraced = false

    /// Silence counts from the connection being up, and lasts at least `atLeastConnectTimes` times
    /// as long as connecting took (when the handler was added before that), so that a slow path is
    /// not taken for a silent peer.
    init(side: LegacyDetection.Side, silence: TimeAmount?, atLeastConnectTimes: Int64 = 0,
         decide: @escaping (Outcome, ChannelHandlerContext) -> Disposition) {
        self.side = side
        self.silence = silence
        self.connectTimes = atLeastConnectTimes
        self.decide = decide
    }

    func handlerAdded(context: ChannelHandlerContext) {
        addedAt = .now()
        if context.channel.isActive { startSilenceTimer(context: context, connectTime: .zero) }
    }

    func channelActive(context: ChannelHandlerContext) {
        if !timerArmed { startSilenceTimer(context: context, connectTime: .now() - addedAt) }
        context.fireChannelActive()
    }

    private func startSilenceTimer(context: ChannelHandlerContext, connectTime: TimeAmount) {
        guard let silence, !decided else { return }
        let wait = max(silence, connectTime * connectTimes)
        self.wait = wait
        waited = wait
        armSilenceTimer(context: context, in: wait)
    }

    private func armSilenceTimer(context: ChannelHandlerContext, in wait: TimeAmount) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timerArmed = true
        context.eventLoop.scheduleTask(in: wait) {
            let (classifier, context) = bound.value
            classifier.silenceTimerFired(context: context)
        }
    }

    /// What the kernel says of a silence the timer saw.
    enum SilenceRecheck: Equatable {
        /// Bytes arrived that the loop has not read yet: the peer was not silent; look again soon.
        case unread
        /// The peer cannot have heard us for the whole wait: wait as long again.
        case notHeardYet
        case silent
    }

    /// Silence as the event loop sees it is not always the peer's. A loop busy with hundreds of
    /// handshakes can run the timer before the read of bytes that arrived in time: TCP knows what
    /// it received. A Fast Open connect reports itself up before its SYN is answered, so an opener's
    /// wait starts before the server can hear anything: while the SYN is unanswered the server
    /// cannot have spoken. And once TCP had to send anything again (the SYN, which Linux first
    /// resends after 1 s, just as the default wait ends, or the OPEN), the server heard us late,
    /// perhaps only just: it gets one more full wait (`retransmissionGraced`). A listener's client
    /// sends first, as soon as it is connected, which is before the listener accepts it: none of
    /// that applies to it.
    static func recheck(_ info: KernelTCPInfo, side: LegacyDetection.Side, heldBytes: Int, retransmissionGraced: Bool) -> SilenceRecheck {
        if info.bytesReceived > UInt64(heldBytes) { return .unread }
        guard side == .opener else { return .silent }
        if info.state == KernelTCPInfo.synSent { return .notHeardYet }
        if info.base.tcpi_total_retrans > 0, !retransmissionGraced { return .notHeardYet }
        return .silent
    }

    private func silenceTimerFired(context: ChannelHandlerContext) {
        guard !decided, !removed else { return }
        guard let provider = context.channel as? any SocketOptionProvider, silenceRechecks < 100 else {
            return evaluate(context: context, silentTooLong: true)
        }
        silenceRechecks += 1
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let future = provider.getKernelTCPInfo()
        future.whenComplete { result in
            let (classifier, context) = bound.value
            guard !classifier.decided, !classifier.removed else { return }
            guard case .success(let info) = result else { return classifier.evaluate(context: context, silentTooLong: true) }
            switch Self.recheck(info, side: classifier.side, heldBytes: classifier.held?.readableBytes ?? 0, retransmissionGraced: classifier.retransmissionGraced) {
            case .unread:
                classifier.armSilenceTimer(context: context, in: .milliseconds(10))
            case .notHeardYet:
                guard let wait = classifier.wait else { return classifier.evaluate(context: context, silentTooLong: true) }
                if info.state != KernelTCPInfo.synSent { classifier.retransmissionGraced = true }
                classifier.waited = (classifier.waited ?? .zero) + wait
                classifier.armSilenceTimer(context: context, in: wait)
            case .silent:
                classifier.evaluate(context: context, silentTooLong: true)
            }
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) { removed = true }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = Self.unwrapInboundIn(data)
        guard !decided else { return context.fireChannelRead(data) }
        if held == nil { held = bytes } else { held!.writeBuffer(&bytes) }
        evaluate(context: context, silentTooLong: false)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if !decided, let event = event as? ChannelEvent, case .inputClosed = event {
            inputEnded = true
            evaluate(context: context, silentTooLong: false)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// A Fast Open connect returns before its SYN is answered, so a port nobody listens on shows up
    /// here, not as a failed connect: that is no verdict on the server, and the error goes on to
    /// the opener as the failed connect it is.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !decided, side == .opener, let io = error as? IOError, Self.neverConnected.contains(io.errnoCode) {
            decided = true
        }
        context.fireErrorCaught(error)
    }

    private static let neverConnected: Set<CInt> = [ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT]

    func channelInactive(context: ChannelHandlerContext) {
        if !decided {
            inputEnded = true
            evaluate(context: context, silentTooLong: false, removeSelf: false)
        }
        context.fireChannelInactive()
    }

    private func evaluate(context: ChannelHandlerContext, silentTooLong: Bool, removeSelf: Bool = true) {
        guard !decided else { return }
        let bytes = held ?? ByteBuffer()
        let verdict = LegacyDetection.classify(bytes.readableBytesView, side: side, silentTooLong: silentTooLong, inputEnded: inputEnded)
        guard verdict != .undecided else { return }
        decided = true
        let evidence: Evidence =
            if LegacyDetection.classify(bytes.readableBytesView, side: side) != .undecided { .bytes } else if inputEnded { .closed } else { .silence }
        let disposition = decide(Outcome(verdict: verdict, evidence: evidence, firstBytes: bytes, waited: evidence == .silence ? waited : nil), context)
        if disposition == .forward {
            if let held, held.readableBytes > 0 { context.fireChannelRead(Self.wrapInboundOut(held)) }
            if inputEnded, context.channel.isActive { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        }
        held = nil
        // On the way down (channelInactive) the handler stays: the event still has to pass it.
        if removeSelf { context.pipeline.syncOperations.removeHandler(context: context, promise: nil) }
    }
}

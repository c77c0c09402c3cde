import NBSProtocol
import NIOCore
import NIOEmbedded
import Testing

@testable import NameBasedSockets

@Suite("Frame reader (zero-copy framing)")
struct FrameReaderTests {
    /// A stream of mixed frames, DATA payloads of many sizes among them.
    func stream(seed: UInt64) -> (bytes: ByteBuffer, frames: [Frame]) {
        var rng = seed | 1
        func next() -> UInt64 {
            rng ^= rng << 13
            rng ^= rng >> 7
            rng ^= rng << 17
            return rng
        }
        var frames: [Frame] = []
        var sequence: UInt64 = 0
        for i in 0..<60 {
            switch next() % 4 {
            case 0:
                frames.append(.dataAck(.init(cumulativeAck: UInt64(i), window: 1000)))
            case 1:
                frames.append(.probe(.init(identifier: next())))
            default:
                let size = Int(next() % UInt64(NBSWire.maxDataPayload)) + 1
                frames.append(.data(.init(sequence: sequence, payload: pattern(size, seed: next()))))
                sequence += UInt64(size)
            }
        }
        var bytes = ByteBuffer()
        NBSWire.writePreamble(into: &bytes)
        for frame in frames { FrameEncoder.encode(frame, into: &bytes) }
        return (bytes, frames)
    }

    @Test("frames come out whole however the stream is split into reads", arguments: [1 as UInt64, 2, 3, 4, 5])
    func anySplit(seed: UInt64) throws {
        var (bytes, frames) = stream(seed: seed)
        let channel = EmbeddedChannel(handler: FrameReader())
        var cut = seed
        while bytes.readableBytes > 0 {
            cut = cut &* 6364136223846793005 &+ 1442695040888963407
            // Reads from 1 byte to 200 KiB, so frames and preamble straddle reads in every way.
            let size = min(bytes.readableBytes, Int(cut >> 33) % 3 == 0 ? Int(cut >> 40) % 7 + 1 : Int(cut >> 40) % 200_000 + 1)
            try channel.writeInbound(bytes.readSlice(length: size)!)
        }
        var received: [Frame] = []
        while let frame = try channel.readInbound(as: Frame.self) { received.append(frame) }
        #expect(received == frames)
        _ = try channel.finish()
    }

    /// Passes frames on and, at the first one, feeds the pipeline another read from inside its
    /// handling, as NIO does when a flush fails on a reset connection.
    final class ReenteringSink: ChannelInboundHandler {
        typealias InboundIn = Frame
        var frames: [Frame] = []
        var nestedRead: ByteBuffer?
        /// What reached this handler, in order: "frame", "end of input".
        var seen: [String] = []
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            frames.append(Self.unwrapInboundIn(data))
            seen.append("frame")
            if let bytes = nestedRead {
                nestedRead = nil
                // As NIO's flush does: the read, then (here) the end of input it found.
                context.pipeline.fireChannelRead(NIOAny(bytes))
                context.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            }
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .inputClosed? = event as? ChannelEvent { seen.append("end of input") }
        }
    }

    @Test("a read nested in the handling of a frame is parsed after the bytes that came before it, and its end of input after that")
    func nestedRead() throws {
        var first = ByteBuffer()
        NBSWire.writePreamble(into: &first)
        FrameEncoder.encode(.data(.init(sequence: 0, payload: pattern(50, seed: 1))), into: &first)
        var whole = ByteBuffer()
        FrameEncoder.encode(.data(.init(sequence: 50, payload: pattern(300, seed: 2))), into: &whole)
        first.writeImmutableBuffer(whole.readSlice(length: 120)!)
        var second = whole
        FrameEncoder.encode(.probe(.init(identifier: 42)), into: &second)
        let sink = ReenteringSink()
        sink.nestedRead = second
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([FrameReader(), sink])
        try channel.writeInbound(first)
        #expect(sink.frames == [
            .data(.init(sequence: 0, payload: pattern(50, seed: 1))),
            .data(.init(sequence: 50, payload: pattern(300, seed: 2))),
            .probe(.init(identifier: 42)),
        ])
        #expect(sink.seen == ["frame", "frame", "frame", "end of input"])
        _ = try channel.finish()
    }

    @Test("a frame header announcing too much is an error at once, before its payload")
    func oversizedHeader() throws {
        var bytes = ByteBuffer()
        NBSWire.writePreamble(into: &bytes)
        bytes.writeBytes([FrameType.probe.rawValue, 0, 0, 0, 0x10, 0])
        let channel = EmbeddedChannel(handler: FrameReader())
        #expect(throws: FrameDecodingError.frameTooLarge(type: FrameType.probe.rawValue, length: 4096, limit: NBSWire.maxControlPayload)) {
            try channel.writeInbound(bytes)
        }
        _ = try? channel.finish()
    }

    @Test("bytes that are not NBS are an error")
    func badMagic() throws {
        let channel = EmbeddedChannel(handler: FrameReader())
        #expect(throws: FrameDecodingError.badMagic) {
            try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\n"))
        }
        _ = try? channel.finish()
    }
}

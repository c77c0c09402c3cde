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

    /// DATA comes out in pieces where a frame spans reads: consecutive DATA frames whose bytes
    /// follow on are merged, in what was sent and in what came out, so that the two compare.
    func mergingData(_ frames: [Frame]) -> [Frame] {
        var merged: [Frame] = []
        for frame in frames {
            if case .data(let piece) = frame, case .data(var previous)? = merged.last,
               previous.sequence + UInt64(previous.payload.readableBytes) == piece.sequence {
                previous.payload.writeImmutableBuffer(piece.payload)
                merged[merged.count - 1] = .data(previous)
            } else {
                merged.append(frame)
            }
        }
        return merged
    }

    @Test("frames come out in order however the stream is split into reads, DATA in pieces that add up", arguments: [1 as UInt64, 2, 3, 4, 5])
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
        #expect(received.count > frames.count, "no DATA frame was split across reads")
        let merged = mergingData(received)
        #expect(merged.count == mergingData(frames).count)
        #expect(merged == mergingData(frames), "the frames that came out are not those sent")
        _ = try channel.finish()
    }

    @Test("a DATA frame that spans two reads comes out as two slices of those reads, not a copy")
    func spanningDataIsNotCopied() throws {
        let payload = pattern(3000, seed: 9)
        var bytes = ByteBuffer()
        NBSWire.writePreamble(into: &bytes)
        FrameEncoder.encode(.data(.init(sequence: 7, payload: payload)), into: &bytes)
        let cut = NBSWire.preambleLength + NBSWire.frameHeaderLength + 8 + 1000
        let reads = [bytes.getSlice(at: 0, length: cut)!, bytes.getSlice(at: cut, length: bytes.readableBytes - cut)!]
        let channel = EmbeddedChannel(handler: FrameReader())
        for read in reads { try channel.writeInbound(read) }
        var pieces: [Frame.Data] = []
        while let frame = try channel.readInbound(as: Frame.self) {
            guard case .data(let data) = frame else { throw CancellationError() }
            pieces.append(data)
        }
        #expect(pieces.map(\.sequence) == [7, 1007])
        #expect(pieces.map(\.payload) == [payload.getSlice(at: 0, length: 1000)!, payload.getSlice(at: 1000, length: 2000)!])
        let start = { (b: ByteBuffer) in b.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) } }
        let end = { (b: ByteBuffer) in b.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) + UInt($0.count) } }
        for (piece, read) in zip(pieces, reads) {
            #expect(start(read) <= start(piece.payload) && end(piece.payload) <= end(read), "a piece is not a slice of its read")
        }
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
        // The second DATA frame comes in two pieces: what the first read held of it, then the rest.
        let second300 = pattern(300, seed: 2)
        #expect(sink.frames == [
            .data(.init(sequence: 0, payload: pattern(50, seed: 1))),
            .data(.init(sequence: 50, payload: second300.getSlice(at: 0, length: 106)!)),
            .data(.init(sequence: 156, payload: second300.getSlice(at: 106, length: 194)!)),
            .probe(.init(identifier: 42)),
        ])
        #expect(sink.seen == ["frame", "frame", "frame", "frame", "end of input"])
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

import NIOCore
import NIOPosix
import Testing

@testable import NameBasedSockets

@Suite("A TCP subflow's delivery rate, which sizes its queues and segments; what small segments cost a receiver")
struct DeliveryRateTests {
    let ms: UInt64 = 1_000_000

    @Test("the rate of acknowledged bytes between observations, the best over the window; close observations merge")
    func windowedMaximum() {
        var rate = DeliveryRate(window: .seconds(1))
        #expect(rate.bytesPerSecond == nil)
        rate.observe(bytesAcked: 1, at: 1_000 * ms)
        #expect(rate.bytesPerSecond == nil)
        // 50 ms later: too close, merged into the next interval.
        rate.observe(bytesAcked: 60_001, at: 1_050 * ms)
        #expect(rate.bytesPerSecond == nil)
        rate.observe(bytesAcked: 125_001, at: 1_100 * ms)
        #expect(rate.bytesPerSecond == 1_250_000)
        // A subflow left short of data reads low: the best stays.
        rate.observe(bytesAcked: 135_001, at: 1_200 * ms)
        #expect(rate.bytesPerSecond == 1_250_000)
        // A better one replaces it at once.
        rate.observe(bytesAcked: 385_001, at: 1_300 * ms)
        #expect(rate.bytesPerSecond == 2_500_000)
        rate.observe(bytesAcked: 485_001, at: 1_400 * ms)
        #expect(rate.bytesPerSecond == 2_500_000)
        // Once the best is older than the window, the next best since it counts, not nothing.
        rate.observe(bytesAcked: 495_001, at: 2_350 * ms)
        #expect(rate.bytesPerSecond == 1_000_000)
        rate.observe(bytesAcked: 505_001, at: 3_400 * ms)
        #expect(rate.bytesPerSecond.map { abs($0 - 10_000_000 / 1_050) < 1 } == true)
    }

    @Test("a count that goes back (a new connection under the same subflow) starts over")
    func countGoesBack() {
        var rate = DeliveryRate()
        rate.observe(bytesAcked: 1_000_000, at: 0)
        rate.observe(bytesAcked: 10, at: 200 * ms)
        #expect(rate.bytesPerSecond == nil)
        rate.observe(bytesAcked: 100_010, at: 300 * ms)
        #expect(rate.bytesPerSecond == 1_000_000)
    }

    @Test("the kernel's tcpi_bytes_acked, read past glibc's tcp_info, counts what a loopback peer acknowledged")
    func kernelCountsAcknowledgedBytes() async throws {
        #expect(MemoryLayout<KernelTCPInfo>.offset(of: \KernelTCPInfo.bytesAcked) == 120)
        #expect(MemoryLayout<KernelTCPInfo>.offset(of: \KernelTCPInfo.bytesReceived) == 128)
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
            .bind(host: "127.0.0.1", port: 0).get()
        let client = try await ClientBootstrap(group: group).connect(to: server.localAddress!).get()
        let provider = try #require(client as? any SocketOptionProvider)
        let before = try await provider.getKernelTCPInfo().get().bytesAcked
        try await client.writeAndFlush(ByteBuffer(repeating: 7, count: 200_000)).get()
        var acked: UInt64 = 0
        for _ in 0..<200 where acked < before + 200_000 {
            try await Task.sleep(for: .milliseconds(10))
            acked = try await provider.getKernelTCPInfo().get().bytesAcked
        }
        #expect(acked >= before + 200_000)
        #expect(SubflowProgress(try await provider.getKernelTCPInfo().get()).bytesAcked == acked)
        try await client.close()
        try await server.close()
    }

    @Test("a small frame sliced from a large read is copied out of it, so that holding it does not hold the read; a large one stays a slice")
    func smallFramesDoNotPinTheirRead() {
        var read = ByteBufferAllocator().buffer(capacity: 1 << 20)
        read.writeBytes((0..<(300 * 1024)).map { UInt8(truncatingIfNeeded: $0) })
        let small = read.getSlice(at: 1000, length: 4096)!
        let unpinned = SessionEngine.unpinned(small)
        #expect(unpinned == small)
        #expect(small.storageCapacity >= 1 << 20)
        #expect(unpinned.storageCapacity < 8 * 1024)
        let large = read.getSlice(at: 0, length: 64 * 1024)!
        #expect(SessionEngine.unpinned(large).storageCapacity == large.storageCapacity)
        let alone = ByteBuffer(bytes: [1, 2, 3, 4])
        #expect(SessionEngine.unpinned(alone).storageCapacity == alone.storageCapacity)
    }
}

import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import NameBasedSockets

/// `NBSOptions.tcpMinimumRTO`: the kernel's floor under a TCP subflow's retransmission timeout, on
/// both ends. The listener sets it on its listening socket, and the sockets it accepts inherit it.
@Suite("TCP subflows' least retransmission timeout")
struct MinimumRTOTests {
    @Test("asked for, both ends' subflows have it; not asked for, the kernel's 200 ms", arguments: [true, false])
    func bothEndsHaveIt(asked: Bool) async throws {
        var options = loopbackOptions()
        options.tcpMinimumRTO = asked ? .milliseconds(50) : nil
        var listenerOptions = NBSOptions()
        listenerOptions.tcpMinimumRTO = options.tcpMinimumRTO
        let server = try await listener(options: listenerOptions)
        let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
        let session = try await server.accept()
        var floors: [Int] = []
        for end in [client, session] {
            let channels = Mutex<[any Channel]>([])
            await end.withSubflowsForTesting(SubflowHandler.self) { handler in
                if let channel = handler.channel { channels.withLock { $0.append(channel) } }
            }
            for channel in channels.withLock({ $0 }) {
                floors.append(Int(try await channel.getOption(.tcpOption(SubflowConnector.tcpMinimumRTO)).get()))
            }
        }
        #expect(floors.count >= 2, "a subflow on each end")
        // The kernel keeps it in jiffies: 50 ms reads back as 50–60 ms.
        #expect(floors.allSatisfy { asked ? (50_000...60_000).contains($0) : $0 == 200_000 }, "\(floors) µs")
        try await closeBothEnds(client, session, listener: server)
    }
}

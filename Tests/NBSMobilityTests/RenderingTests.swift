import Foundation
@testable import NameBasedSockets
import NIOCore
import Testing

@testable import nbs_mobility

func subflowInfo(_ id: UInt32, _ local: String, _ remote: String, state: SubflowState = .active, sent: Int = 0, received: Int = 0) -> SubflowInfo {
    SubflowInfo(id: id, local: try! SocketAddress(ipAddress: local, port: 0), remote: try! SocketAddress(ipAddress: remote, port: 7000),
                interface: "nbs\(id)", state: state, rttMilliseconds: 12.5, bytesSent: sent, bytesReceived: received,
                reinjectedBytes: 0, closeReason: state == .closed ? "interface nbs\(id) down" : nil)
}

func sessionStatus(_ subflows: [SubflowStatus], expected: Int? = 32 << 20, done: Int = 12 << 20) -> SessionStatus {
    SessionStatus(id: 1, role: "client", localName: "client.nbs.test", peerName: "server.nbs.test", port: 7000,
                  peerVerification: "claimed", elapsedS: 3.25, expectedBytes: expected, bytesDone: done, progress: "sent", finished: nil,
                  sendMbps: subflows.reduce(0) { $0 + $1.sendMbps }, recvMbps: 0, reinjectedBytes: 262_144, subflows: subflows)
}

@Suite struct RenderingTests {
    @Test func progressBar() {
        #expect(LiveViewRenderer.progressBar(done: 0, of: 100, width: 10) == "[..........]  0.0 MiB/0.0 MiB  0%")
        #expect(LiveViewRenderer.progressBar(done: 12 << 20, of: 32 << 20, width: 8) == "[###.....]  12.0 MiB/32.0 MiB  37%")
        #expect(LiveViewRenderer.progressBar(done: 40 << 20, of: 32 << 20, width: 4) == "[####]  40.0 MiB/32.0 MiB  100%")
    }

    @Test func statesAsTheViewNamesThem() {
        #expect(displayState(.connecting) == "joining")
        #expect(displayState(.stalled) == "probing")
        #expect(displayState(.closed) == "retired")
        #expect(displayState(.backup) == "backup")
        #expect(displayState(.active) == "active")
    }

    @Test func oneRowPerSubflowWithEveryColumn() {
        let rows = [SubflowRow(info: subflowInfo(1, "192.0.2.2", "192.0.2.1", sent: 3 << 20), sendMbps: 9.5, receiveMbps: 0),
                    SubflowRow(info: subflowInfo(2, "198.51.100.2", "198.51.100.1", state: .closed, sent: 1024), sendMbps: 0, receiveMbps: 0)]
        let status = sessionStatus(rows.map(SubflowStatus.init))
        let lines = LiveViewRenderer.sessionLines(status)
        #expect(lines[0].hasPrefix("client.nbs.test -> server.nbs.test:7000  [claimed]  client  3.2 s"))
        #expect(lines[1].contains("12.0 MiB/32.0 MiB  37%"))
        #expect(lines[1].contains("reinjected 256.0 KiB"))
        #expect(lines[2] == LiveViewRenderer.columns)
        let first = lines[3].split(separator: " ", omittingEmptySubsequences: true)
        #expect(first == ["1", "192.0.2.2", "->", "192.0.2.1", "nbs1", "active", "12.5", "9.50", "0.00", "3.0", "MiB", "0", "B"])
        #expect(lines[4].contains("retired"))
        // Columns line up: every row is as wide as the header up to the last column.
        #expect(lines[3].count == LiveViewRenderer.columns.count)
        let withoutRetired = LiveViewRenderer.sessionLines(status) { $0.state != "closed" }
        #expect(withoutRetired.count == 4)
    }

    @Test func plainStatusLineWithoutProgressTarget() {
        let rows = [SubflowRow(info: subflowInfo(1, "2001:db8:1::2", "2001:db8:1::1", received: 5000), sendMbps: 0, receiveMbps: 1.25)]
        var status = sessionStatus(rows.map(SubflowStatus.init), expected: nil, done: 5000)
        status.role = "server"
        let line = LiveViewRenderer.statusLine(status)
        #expect(line.hasPrefix("[   3.25s] client.nbs.test <- server.nbs.test 4.9 KiB"))
        #expect(line.contains("1:2001:db8:1::2->2001:db8:1::1 active 0.00/1.25"))
    }

    @Test func longLinesAreCutToTheTerminal() {
        #expect(LiveViewRenderer.fit("abcdef", width: 10) == "abcdef")
        #expect(LiveViewRenderer.fit("abcdefghijkl", width: 5) == "abcd…")
    }

    @Test func eventsReadLikeWhatHappened() {
        let info = subflowInfo(3, "192.0.2.2", "192.0.2.1", state: .closed)
        #expect(describe(.subflowUp(info)) == "subflow 3 up 192.0.2.2 -> 192.0.2.1 on nbs3")
        #expect(describe(.subflowDown(info, reason: "interface nbs3 down")) == "subflow 3 down 192.0.2.2 -> 192.0.2.1: interface nbs3 down")
        #expect(describe(.interfaceDown("nbs3")) == "link nbs3 down")
        #expect(describe(.reinjected(bytes: 4096, from: 3)) == "reinjected 4096 bytes from subflow 3")
        #expect(describe(.localAddressAdded(try! SocketAddress(ipAddress: "198.51.100.11", port: 0), interface: "nbs2")) == "address 198.51.100.11 added on nbs2")
        #expect(describe(.waiting) == "waiting: no path left")
        #expect(LiveViewRenderer.eventLine(1.5, .resumed, session: 2) == "[   1.50s] session 2: resumed")
    }
}

@Suite struct RateTests {
    let clock = ContinuousClock.now

    @Test func ratesComeFromCounterDifferences() {
        let first = SessionSample.next(after: nil, subflows: [subflowInfo(1, "192.0.2.2", "192.0.2.1", sent: 0)], statistics: .init(), at: clock)
        #expect(first.sendMbps == 0)
        // 1 250 000 bytes in one second: 10 Mbit/s, and a full-second step takes the whole new value.
        let second = SessionSample.next(after: first, subflows: [subflowInfo(1, "192.0.2.2", "192.0.2.1", sent: 1_250_000)],
                                        statistics: .init(), at: clock + .seconds(1))
        #expect(abs(second.sendMbps - 10) < 1e-9)
        // A quarter-second step moves a quarter of the way: the smoothing that keeps 4 Hz calm.
        let third = SessionSample.next(after: second, subflows: [subflowInfo(1, "192.0.2.2", "192.0.2.1", sent: 1_250_000)],
                                       statistics: .init(), at: clock + .milliseconds(1250))
        #expect(abs(third.sendMbps - 7.5) < 1e-9)
    }

    @Test func aNewSubflowStartsAtZeroAndCountersNeverGoNegative() {
        let first = SessionSample.next(after: nil, subflows: [subflowInfo(1, "192.0.2.2", "192.0.2.1", sent: 100)], statistics: .init(), at: clock)
        let second = SessionSample.next(after: first, subflows: [subflowInfo(1, "192.0.2.2", "192.0.2.1", sent: 50),
                                                                 subflowInfo(2, "198.51.100.2", "198.51.100.1", sent: 1_000_000)],
                                        statistics: .init(), at: clock + .seconds(1))
        #expect(second.subflows.map(\.sendMbps) == [0, 0])
    }
}

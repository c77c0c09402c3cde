import NIOCore
import Testing

@testable import nbs_mobility

@Suite struct TimelineTests {
    @Test func bytesLandInTheBinOfTheirArrivalAndGapsStayAsZeros() {
        let origin = ContinuousClock.now
        var trace = ReceiveTimeline(origin: origin)
        trace.record(10, at: origin + .milliseconds(50))
        trace.record(20, at: origin + .milliseconds(150))
        trace.record(5, at: origin + .milliseconds(199))
        trace.record(1, at: origin + .milliseconds(450))
        #expect(trace.bins == [10, 25, 0, 0, 1])
        #expect(trace.text == "0 10\n100 25\n200 0\n300 0\n400 1\n")
    }

    @Test func gapsFromTwentyMillisecondsAreListedAndTheLongestKept() {
        let origin = ContinuousClock.now
        var meter = ReceiveMeter()
        let one = [ByteBuffer(bytes: [1])]
        for ms in [0, 10, 29, 30, 50, 150, 160] { meter.record(one, at: origin + .milliseconds(ms)) }
        #expect(meter.stalls.map(\.length) == [.milliseconds(20), .milliseconds(100)], "19 ms is not listed; 20 ms is")
        #expect(meter.stalls.map(\.start) == [origin + .milliseconds(30), origin + .milliseconds(50)])
        #expect(meter.maxStall == .milliseconds(100))
        #expect(meter.bytes == 7)
    }

    @Test func pastTheListLimitTheShortestGapGivesWayToALongerOneAndTheRestAreCounted() {
        let origin = ContinuousClock.now
        var meter = ReceiveMeter()
        let one = [ByteBuffer(bytes: [1])]
        var ms = 0
        meter.record(one, at: origin)
        for _ in 0..<ReceiveMeter.listedGapLimit {
            ms += 25
            meter.record(one, at: origin + .milliseconds(ms))
        }
        // A fault late in a long transfer: its gap is kept, at the end; an ordinary one is not.
        ms += 500
        meter.record(one, at: origin + .milliseconds(ms))
        ms += 25
        meter.record(one, at: origin + .milliseconds(ms))
        #expect(meter.stalls.count == ReceiveMeter.listedGapLimit)
        #expect(meter.stalls.last?.length == .milliseconds(500))
        #expect(meter.unlistedGaps == 2)
        #expect(zip(meter.stalls, meter.stalls.dropFirst()).allSatisfy { $0.start < $1.start }, "still in order")
    }

    @Test func earlyBytesCountInTheFirstBinAndThoseBeyondTheBoundAreDropped() {
        let origin = ContinuousClock.now
        var trace = ReceiveTimeline(origin: origin, bin: .milliseconds(10))
        trace.record(7, at: origin - .milliseconds(5))
        #expect(trace.bins == [7])
        trace.record(1, at: origin + .seconds(3600 * 24 * 365))
        #expect(trace.bins == [7])
        #expect(ReceiveTimeline(origin: origin).text == "")
    }
}

"""Statistics (``analysis.stats``), analytic FLOPs (``analysis.flops``) and figures (``analysis.figures``)
of the pipeline's measured outputs: functions, data in, numbers / tables / figures out."""
